"""The Optuna study of a search, rebuilt from the log's state (state.py) for each decision:
every trial on the log is added with `create_trial` (complete with its objective, pruned or
failed, or running with the epochs reported so far), then the sampler proposes the next
trial or the pruner judges a running one. The study keeps nothing the log does not, so a
restarted service decides from the same history; the sampler is seeded by search id and
trial number, so the same history asks the same parameters.
"""

from __future__ import annotations

import hashlib
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from mlbus.consumers.tuning.state import Search, Trial
from mlbus.schemas.search import Param
from mlbus.search import grid

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distribution(p: Param) -> BaseDistribution:
    if p.type == "categorical":
        return CategoricalDistribution(list(p.choices or []))
    assert p.low is not None and p.high is not None
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(p.low, p.high, log=p.log, step=p.step)


def seed_of(search_id: str, number: int, base: int) -> int:
    digest = hashlib.sha256(f"{search_id}/{number}/{base}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sampler(search: Search, number: int) -> optuna.samplers.BaseSampler:
    r = search.request
    seed = seed_of(r.search_id, number, r.seed)
    if r.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if r.sampler == "grid":
        # One seed per search: the grid's shuffled order is then fixed, and Optuna gives
        # trial n the n-th point of it, so no point is asked twice while any is left.
        fixed = seed_of(r.search_id, 0, r.seed)
        return optuna.samplers.GridSampler(grid(r.space), seed=fixed)
    # A small budget starts modelling sooner than Optuna's 10 random trials; constant liar
    # keeps parallel trials apart.
    startup = max(3, min(10, r.trials // 4))
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, constant_liar=True, multivariate=True
    )


def pruner(search: Search) -> optuna.pruners.BasePruner:
    r = search.request
    if r.pruner == "median":
        # At least a few finished trials to take a median of; never on the first epoch
        # (epochs are steps 1, 2, …: Optuna prunes no step below n_warmup_steps).
        startup = max(2, min(5, r.trials // 4))
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=2)
    if r.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=HALVING)
    return optuna.pruners.NopPruner()


HALVING = 3  # successive halving's reduction factor; rungs end at epochs 1, 3, 9, 27…


def _rungs(values: dict[int, float]) -> dict[str, float]:
    """Successive halving's record of the rungs a trial completed (the objective at epochs
    1, 3, 9…), which Optuna keeps in system attributes: derived from the values on the log,
    as the pruner would have written them judging each epoch in turn."""
    attrs, rung = {}, 0
    while HALVING**rung in values:
        attrs[f"completed_rung_{rung}"] = values[HALVING**rung]
        rung += 1
    return attrs


def _frozen(t: Trial, dists: dict[str, BaseDistribution], upto: int | None) -> Any:
    values = {e: v for e, v in t.values.items() if upto is None or e <= upto}
    # The epoch being judged has no rung mark yet: the pruner sets it if the trial goes on.
    marked = {e: v for e, v in values.items() if upto is None or e < upto}
    if t.outcome == "completed" and t.value is not None and upto is None:
        state, value = TrialState.COMPLETE, t.value
    elif t.outcome == "pruned" and upto is None:
        state, value = TrialState.PRUNED, None
    elif t.outcome in ("failed", "completed") and upto is None:
        state, value = TrialState.FAIL, None
    else:
        state, value = TrialState.RUNNING, None
    return create_trial(
        state=state,
        value=value,
        params=t.params,
        distributions={k: dists[k] for k in t.params},
        intermediate_values=values,
        system_attrs=_rungs(marked),
    )


def study_of(search: Search, *, judged: Trial | None = None, upto: int | None = None) -> Any:
    """The study as the log has it; `judged` is added last (as running, its values up to
    epoch `upto`) so the pruner can be asked about it."""
    r = search.request
    dists = {name: distribution(p) for name, p in r.space.items()}
    number = len(search.asked())
    study = optuna.create_study(
        direction="maximize" if r.objective.direction == "max" else "minimize",
        sampler=sampler(search, number),
        pruner=pruner(search),
    )
    for t in search.asked():
        if judged is not None and t.number == judged.number:
            continue
        study.add_trial(_frozen(t, dists, None))
    if judged is not None:
        study.add_trial(_frozen(judged, dists, upto))
    return study


def should_prune(search: Search, trial: Trial, epoch: int) -> bool:
    """The pruner's verdict on `trial` as of `epoch` (its values up to there)."""
    if search.request.pruner == "none":
        return False
    study = study_of(search, judged=trial, upto=epoch)
    frozen = study.get_trials(deepcopy=False)[-1]
    return bool(study.pruner.prune(study, frozen))


def propose(search: Search) -> dict[str, Any]:
    """The parameters of the next trial (number `len(search.asked())`)."""
    r = search.request
    dists = {name: distribution(p) for name, p in r.space.items()}
    study = study_of(search)
    trial = study.ask(dists)
    params = dict(trial.params)
    for name, p in r.space.items():  # plain Python numbers on the wire
        if p.type == "int":
            params[name] = int(params[name])
        elif p.type == "float":
            params[name] = float(params[name])
    return params

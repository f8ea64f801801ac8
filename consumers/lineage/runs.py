"""Experiments: training runs as the lineage store knows them (a projection of the
`training.*` topics: requested, started, progress, completed, failed), listed, shown one by
one and compared side by side — read from the store, never by replaying the log per request.

A run's state is a fold of whichever of its events are known, joined on the run id at query
time (the request names its run through `run_id_for`), so it does not depend on the order
the events arrived in: completed once a `training.completed` names it, failed once a
non-retryable `training.failed` does, running once a worker started it (or reported an
epoch, or failed it retryably), requested before that. Metrics stay a name → value map
(`split.metric`), whatever the task measures: accuracy and F1, or RMSE, MAE and R².
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.store import LineageError, LineageStore, NotInLineage, iso
from mlbus.errors import Invalid

STATUSES = ("requested", "running", "completed", "failed")
#: Metric names where lower is better (losses, errors, times); any other: higher is better.
_LOWER = ("loss", "rmse", "mae", "mse", "error", "latency", "seconds", "_ms")


class InvalidRunQuery(LineageError, Invalid):
    """A run listing or comparison asked with arguments that cannot be answered (an unknown
    status, an ambiguous run id prefix). 422, as FastAPI
    answers a query parameter it cannot parse."""

    status = 422


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    model: str
    status: str  # requested, running, completed, failed
    family: str | None = None
    dataset: str | None = None
    """name@version"""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    """flat final metrics ("test.accuracy", "test.rmse"); a run not finished: its newest
    epoch's ("validation.loss")"""
    version: str | None = None
    """the model version the run produced"""
    requested_by: str | None = None
    pipeline: str | None = None
    sweep_id: str | None = None
    requested_at: str | None = None
    finished_at: str | None = None
    epochs: int | None = None
    """epochs done (reported)"""
    max_epochs: int | None = None
    duration_seconds: float | None = None
    failure: str | None = None


@dataclass(frozen=True)
class RunEpoch:
    epoch: int
    metrics: dict[str, float]
    samples_per_second: float | None = None


@dataclass(frozen=True)
class RunDecision:
    kind: str  # promoted, rejected
    version: str
    actor: str
    reason: str
    policy: str | None
    rollback: bool
    time: str | None


@dataclass(frozen=True)
class RunDetail(RunSummary):
    request_id: str | None = None
    seed: int | None = None
    request: dict[str, Any] = field(default_factory=dict)
    """the rest of the request: early stopping, split, device, sweep point…"""
    worker: str | None = None
    attempts: int | None = None
    resumed_from_epoch: int | None = None
    curves: list[RunEpoch] = field(default_factory=list)
    final_metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """split → metric → value, as the run reported them (null: not measured)"""
    confusion_matrix: list[list[int]] | None = None
    labels: list[str] | None = None
    artifact: dict[str, Any] | None = None
    code_version: str | None = None
    git_commit: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """the rest of the completion: device, torch version, peak memory…"""
    decisions: list[RunDecision] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class CompareRow:
    name: str
    values: list[Any]
    """one per run, in the order of `Comparison.runs`; None where the run has none"""
    differs: bool
    best: int | None = None
    """metrics: the index of the best run (lower is better for losses and errors)"""


@dataclass(frozen=True)
class Comparison:
    runs: list[RunDetail]
    hyperparameters: list[CompareRow]
    metrics: list[CompareRow]
    curves: list[str]
    """the per-epoch metrics worth plotting: the losses and the policy's metric"""
    policy_metric: str | None


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(word in name for word in _LOWER)


def flat(metrics: dict[str, Any]) -> dict[str, float]:
    """{"test": {"accuracy": x}} as {"test.accuracy": x}; unmeasured ones (NaN) left out."""
    return {
        f"{split}.{name}": value
        for split, values in metrics.items()
        if isinstance(values, dict)
        for name, value in values.items()
        if isinstance(value, int | float) and not math.isnan(value)
    }


def _measured(metrics: dict[str, Any]) -> dict[str, float]:
    """A per-epoch metrics map without the unmeasured (NaN, stored as null)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not math.isnan(v)}


def _json(value: Any) -> Any:
    import orjson

    return orjson.loads(value) if isinstance(value, str | bytes) else value


class RunQueries:
    """Runs of one store: `list`, `show`, `compare`. Unknown runs raise `NotInLineage`
    (404), a prefix naming several `InvalidRunQuery` (422)."""

    def __init__(self, store: LineageStore) -> None:
        self.store = store

    # -- listing -------------------------------------------------------------------------------

    def list(
        self,
        model: str | None = None,
        status: str | None = None,
        *,
        sort: str | None = None,
        descending: bool | None = None,
        limit: int | None = None,
    ) -> list[RunSummary]:
        """Runs, newest request first; of `model`, in `status`; or sorted by a metric (best
        first unless `descending` says otherwise; runs without it last)."""
        if status is not None and status not in STATUSES:
            raise InvalidRunQuery(f"status {status!r}: use one of {', '.join(STATUSES)}")
        with self.store.reading("listing runs") as conn:
            folded = _fold(conn, model, None)
        runs = [_summary(f) for f in folded.values()]
        if status is not None:
            runs = [r for r in runs if r.status == status]
        runs.sort(key=lambda r: (r.requested_at or r.finished_at or "", r.run_id), reverse=True)
        if sort:
            down = not lower_is_better(sort) if descending is None else descending
            have = [r for r in runs if sort in r.metrics]
            have.sort(key=lambda r: r.metrics[sort], reverse=down)
            runs = have + [r for r in runs if sort not in r.metrics]
        return runs[:limit] if limit is not None else runs

    # -- one run -------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """A run id from what a user typed: the id, a unique prefix of it, or `model@version`
        (the run that produced that version)."""
        with self.store.reading("resolving a run") as conn:
            return _resolve(conn, ref)

    def show(self, ref: str) -> RunDetail:
        with self.store.reading("reading a run") as conn:
            run_id = _resolve(conn, ref)
            folded = _fold(conn, None, [run_id])
            if run_id not in folded:
                raise NotInLineage(f"run {ref!r} is not known")
            return _detail(conn, folded[run_id])

    def compare(self, refs: Sequence[str]) -> Comparison:
        """Runs side by side: hyperparameters and final metrics (which differ, which run is
        best at each metric) and the names of the curves worth plotting."""
        if not refs:
            raise NotInLineage("no run named to compare")
        with self.store.reading("comparing runs") as conn:
            ids = list(dict.fromkeys(_resolve(conn, ref) for ref in refs))
            folded = _fold(conn, None, ids)
            missing = [i for i in ids if i not in folded]
            if missing:
                raise NotInLineage(f"run {missing[0]!r} is not known")
            runs = [_detail(conn, folded[i]) for i in ids]
            policy = _policy_metric(conn, {r.model for r in runs})
        return Comparison(
            runs=runs,
            hyperparameters=_rows([r.hyperparameters for r in runs], metrics=False),
            metrics=_rows([r.metrics for r in runs], metrics=True),
            curves=curve_names(runs, policy),
            policy_metric=policy,
        )


def curve_names(runs: Iterable[RunDetail], policy: str | None) -> list[str]:
    """Losses first, then the per-epoch form of the policy's metric (`test.accuracy` is
    measured per epoch on the validation split: `validation.accuracy`)."""
    names: list[str] = []
    for run in runs:
        for epoch in run.curves:
            names.extend(n for n in epoch.metrics if n not in names)
    chosen = [n for n in names if n.endswith("loss")]
    if policy is None:  # no pipeline: the first metric measured per epoch that is not a loss
        policy = next((n for n in names if n not in chosen), None)
    if policy is not None:
        metric = policy.split(".", 1)[-1]
        for candidate in (policy, f"validation.{metric}"):
            if candidate in names and candidate not in chosen:
                chosen.append(candidate)
                break
    return chosen or names[:2]


def _rows(maps: list[dict[str, Any]], *, metrics: bool) -> list[CompareRow]:
    names: list[str] = []
    for m in maps:
        names.extend(n for n in m if n not in names)
    rows = []
    for name in sorted(names):
        values = [m.get(name) for m in maps]
        present = [v for v in values if v is not None]
        differs = len({repr(v) for v in values}) > 1
        best = None
        if metrics and len(present) > 1 and differs:
            pick = min if lower_is_better(name) else max
            best = values.index(pick(present))
        rows.append(CompareRow(name, values, differs, best))
    return rows


# -- the fold -------------------------------------------------------------------------------------


class _Fold:
    """Every row known of one run, from each table."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.request: Any = None
        self.started: list[Any] = []
        self.failures: list[Any] = []
        self.completed: Any = None
        self.last_epoch: Any = None
        self.model: str | None = None


def _fold(conn: Any, model: str | None, ids: list[str] | None) -> dict[str, _Fold]:
    r, s, f, m, p = (
        t.training_requests,
        t.training_runs,
        t.run_failures,
        t.model_versions,
        t.run_progress,
    )

    def where(query: Any, table: sa.Table) -> Any:
        if model is not None:
            query = query.where(table.c.model == model)
        if ids is not None:
            query = query.where(table.c.run_id.in_(ids))
        return query.order_by(table.c.time, table.c.event_id)

    runs: dict[str, _Fold] = {}

    def of(run_id: str, name: str) -> _Fold:
        found = runs.get(run_id)
        if found is None:
            found = runs[run_id] = _Fold(run_id)
        found.model = found.model or name
        return found

    for row in conn.execute(where(sa.select(r), r)):
        run = of(row.run_id, row.model)
        run.request = run.request or row  # a re-published request: the first counts
    for row in conn.execute(where(sa.select(s), s)):
        of(row.run_id, row.model).started.append(row)
    for row in conn.execute(where(sa.select(f), f)):
        of(row.run_id, row.model).failures.append(row)
    for row in conn.execute(where(sa.select(m), m)):
        run = of(row.run_id, row.model)
        run.completed = run.completed or row
    # the newest epoch of each run (for the runs not finished: their metrics so far)
    newest = sa.select(p.c.run_id, sa.func.max(p.c.epoch).label("epoch")).group_by(p.c.run_id)
    if model is not None:
        newest = newest.where(p.c.model == model)
    if ids is not None:
        newest = newest.where(p.c.run_id.in_(ids))
    latest = newest.subquery()
    query = (
        sa.select(p)
        .join(latest, sa.and_(p.c.run_id == latest.c.run_id, p.c.epoch == latest.c.epoch))
        .order_by(p.c.time, p.c.event_id)
    )
    for row in conn.execute(query):
        run = of(row.run_id, row.model)
        run.last_epoch = row  # of several reports of one epoch (a resumed run): the newest
    return runs


def _status(run: _Fold) -> str:
    if run.completed is not None:
        return "completed"
    if any(not x.retryable for x in run.failures):
        return "failed"
    if run.started or run.failures or run.last_epoch is not None:
        return "running"
    return "requested"


def _summary(run: _Fold) -> RunSummary:
    req, done, last = run.request, run.completed, run.last_epoch
    status = _status(run)
    final = [x for x in run.failures if not x.retryable]
    source = done or req or (run.started[0] if run.started else None)
    dataset = f"{source.dataset_name}@{source.dataset_version}" if source is not None else None
    hyper = _json(done.hyperparameters) if done is not None else {}
    if not hyper and req is not None:
        hyper = _json(req.hyperparameters)
    if done is not None:
        metrics = flat(_json(done.metrics))
    elif last is not None:
        metrics = _measured(_json(last.metrics))
    else:
        metrics = {}
    finished = done.time if done is not None else (final[0].time if final else None)
    return RunSummary(
        run_id=run.run_id,
        model=run.model or "",
        status=status,
        family=done.family if done is not None else (req.family if req is not None else None),
        dataset=dataset,
        hyperparameters=hyper,
        metrics=metrics,
        version=done.version if done is not None else None,
        requested_by=req.requested_by if req is not None else None,
        pipeline=req.pipeline if req is not None else None,
        sweep_id=req.sweep_id if req is not None else None,
        requested_at=iso(req.time) if req is not None else None,
        finished_at=iso(finished),
        epochs=done.epochs if done is not None else (last.epoch if last is not None else None),
        max_epochs=(
            req.max_epochs if req is not None else (last.max_epochs if last is not None else None)
        ),
        duration_seconds=done.duration_seconds if done is not None else None,
        failure=final[0].reason if final and status == "failed" else None,
    )


def _detail(conn: Any, run: _Fold) -> RunDetail:
    p, d = t.run_progress, t.decisions
    summary = _summary(run)
    rows = conn.execute(
        sa.select(p).where(p.c.run_id == run.run_id).order_by(p.c.epoch, p.c.time, p.c.event_id)
    ).all()
    epochs: dict[int, RunEpoch] = {}
    for row in rows:  # a resumed run reports an epoch again: the newest report counts
        epochs[row.epoch] = RunEpoch(
            row.epoch, _measured(_json(row.metrics)), row.samples_per_second
        )
    decisions = []
    done = run.completed
    if done is not None:
        decided = conn.execute(
            sa.select(d)
            .where(d.c.model == done.model, d.c.version == done.version)
            .order_by(d.c.time, d.c.offset, d.c.event_id)
        ).all()
        decisions = [
            RunDecision(
                kind=x.kind,
                version=x.version,
                actor=x.actor,
                reason=x.reason,
                policy=f"{x.policy_name} v{x.policy_version}" if x.policy_name else None,
                rollback=bool(x.rollback),
                time=iso(x.time),
            )
            for x in decided
        ]
    details = dict(_json(done.details)) if done is not None else {}
    artifact = None
    if done is not None:
        artifact = {"uri": done.artifact_uri, "sha256": done.artifact_sha256}
        more = details.pop("artifact", None) or {}
        artifact.update({k: v for k, v in more.items() if v is not None})
    req = run.request
    fields = {k: getattr(summary, k) for k in RunSummary.__dataclass_fields__}
    return RunDetail(
        **fields,
        request_id=(req.event_id if req is not None else None)
        or (done.request_id if done is not None else None),
        seed=done.seed if done is not None else (req.seed if req is not None else None),
        request=_json(req.details) if req is not None else {},
        worker=run.started[-1].worker if run.started else None,
        attempts=max((s.attempt for s in run.started), default=None),
        resumed_from_epoch=next(
            (s.resumed_from_epoch for s in reversed(run.started) if s.resumed_from_epoch), None
        ),
        curves=[epochs[e] for e in sorted(epochs)],
        final_metrics=_json(done.metrics) if done is not None else {},
        confusion_matrix=details.pop("confusion_matrix", None),
        labels=details.pop("labels", None),
        artifact=artifact,
        code_version=done.code_version if done is not None else None,
        git_commit=done.git_commit if done is not None else None,
        details={k: v for k, v in details.items() if v is not None},
        decisions=decisions,
        failures=[
            {
                "reason": x.reason,
                "retryable": bool(x.retryable),
                "error_type": x.error_type,
                "epoch": x.epoch,
                "time": iso(x.time),
            }
            for x in run.failures
        ],
    )


def _resolve(conn: Any, ref: str) -> str:
    ref = ref.strip()
    if not ref:
        raise NotInLineage("no run named (an empty run id)")
    if "@" in ref:  # model@version: the run that produced it
        model, _, version = ref.partition("@")
        m = t.model_versions
        found = conn.execute(
            sa.select(m.c.run_id, m.c.version)
            .where(m.c.model == model, m.c.version.startswith(version, autoescape=True))
            .order_by(m.c.time, m.c.event_id)
        ).all()
        runs = {r.run_id for r in found}
        if len(runs) > 1:
            raise InvalidRunQuery(f"{ref!r} names more than one version of {model}")
        if not runs:
            raise NotInLineage(f"model version {ref!r} is not known")
        return runs.pop()
    ids: set[str] = set()
    for table in (t.training_requests, t.training_runs, t.model_versions, t.run_failures):
        ids.update(
            conn.execute(
                sa.select(table.c.run_id)
                .where(table.c.run_id.startswith(ref, autoescape=True))
                .distinct()
                .limit(2)
            ).scalars()
        )
        if ref in ids:
            return ref
    if len(ids) > 1:
        raise InvalidRunQuery(f"run {ref!r} is ambiguous: give more of its id")
    if not ids:
        raise NotInLineage(f"run {ref!r} is not known")
    return ids.pop()


def _policy_metric(conn: Any, models: set[str]) -> str | None:
    """The metric the newest pipeline of these models promotes by (None: no pipeline)."""
    pl = t.pipelines
    row = conn.execute(
        sa.select(pl.c.policy)
        .where(pl.c.model.in_(sorted(models)))
        .order_by(pl.c.time.desc(), pl.c.event_id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    policy = _json(row.policy) or {}
    metric = policy.get("metric") if isinstance(policy, dict) else None
    return metric if isinstance(metric, str) else None

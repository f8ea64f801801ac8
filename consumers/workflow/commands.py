"""Manual decisions and the pipeline listing, shared by the CLI (`mlbus models promote|
rollback|abort|traffic`, `mlbus pipelines list`) and the HTTP API. A manual promotion or
rollback is a `model.promoted` like the policy's, with the user as actor; it carries the
artifact and dataset of the version (from its `training.completed`, or from an earlier
promotion of it), so serving can load it. A promotion with a strategy (canary, shadow, A/B)
starts a rollout instead: one `model.traffic` event, checked whole before it is published
(weights, steps, the candidate not serving already and not failed to load, no other rollout
in progress), so a refused request changes nothing. Reads `training.completed`,
`model.promoted`, `model.rejected`, `model.traffic`, `deployment.updated` (and
`pipeline.defined` for the listing); writes `model.promoted` and `model.traffic`. No service
needs to run.

The model listing is not here: it is a query of the lineage store (the composition root
serves it), which does not replay the log per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlbus.consumers.workflow import rollout as rollouts
from mlbus.consumers.workflow.policy import flat_metrics
from mlbus.consumers.workflow.state import Model, State, read_state
from mlbus.errors import Conflict, Invalid, UnknownModel
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView, Positioned
from mlbus.kafka.producer import EventProducer
from mlbus.refs import resolve
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event, new_event_id
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.schemas.traffic import ModelTraffic, Strategy, TrafficCriteria, inconsistency
from mlbus.schemas.training import Artifact, TrainingCompleted


class NothingToRollBack(Conflict):
    """The model has no earlier good version."""


class InvalidRollout(Invalid):
    """Weights that do not sum to 100, steps out of order, options of another strategy."""


class RolloutConflict(Conflict):
    """A rollout in progress, a candidate already serving or failed to load, no champion."""


def _model(state: State, name: str) -> Model:
    model = state.models.get(name)
    if model is None:
        known = ", ".join(sorted(state.models)) or "none"
        raise UnknownModel(f"no model {name!r} in the log (models: {known})")
    return model


def _version(model: Model, version: str) -> tuple[str, Event | None, ModelPromoted | None]:
    """(full version, its training.completed, its newest promotion); a unique prefix will do."""
    versions = set(model.runs) | {p.data.version for p in model.promotions}
    full = resolve(model.name, version, versions, kind="model", error=UnknownModel)
    promoted = next((p.data for p in reversed(model.promotions) if p.data.version == full), None)
    return full, model.runs.get(full), promoted


SOURCE = "mlbus/cli"


def _publish(kafka: KafkaConfig, payload: Payload) -> Event:
    event = wrap(payload, source=SOURCE)
    _send(kafka, event)
    return event


def _send(kafka: KafkaConfig, *events: Event) -> None:
    """Publish events in order, confirmed by the broker before returning."""
    with EventProducer(kafka, source=SOURCE) as producer:
        for event in events:
            producer.send(event)
        producer.flush()


#: What a manual decision is checked against. Read from the log, not from the lineage store:
#: the decision must see the log as it is when it is written (a version trained or promoted a
#: moment ago, the champion a promotion just replaced), and a projection may lag behind it.
DECIDING = ("training.completed", "model.promoted", "model.rejected", "model.traffic")


def promote(
    kafka: KafkaConfig,
    model_name: str,
    version: str,
    *,
    reason: str,
    actor: str,
    strategy: Strategy | None = None,
    weight: int | None = None,
    weights: Mapping[str, int] | None = None,
    steps: list[int] | None = None,
    criteria: TrafficCriteria | None = None,
) -> Event:
    """Promote a version by hand (it then serves, whatever the policy said); with a
    `strategy`, start a rollout of it instead (`start_rollout`). Promoting the candidate of
    the rollout in progress completes it (`model.traffic` completed, then `model.promoted`
    with its evidence); promoting another version while one is in progress is refused."""
    if strategy is not None:
        return start_rollout(
            kafka,
            model_name,
            version,
            strategy=strategy,
            weight=weight,
            weights=weights,
            steps=steps,
            criteria=criteria,
            reason=reason,
            actor=actor,
        )
    if weight is not None or weights or steps:
        raise InvalidRollout("weights and steps need a strategy: --canary, --shadow or --ab")
    state = read_state(kafka, DECIDING)
    model = _model(state, model_name)
    full, run, promoted = _version(model, version)
    artifact, dataset, run_id = _origin(run, promoted, model_name, full)
    current = model.rollout
    if current is not None:
        traffic: ModelTraffic = current.data
        if full != traffic.candidate:
            raise RolloutConflict(
                f"model {model_name}: a {traffic.strategy} rollout of {traffic.candidate} is in "
                f"progress (rollout {traffic.rollout_id}); promote {traffic.candidate} to "
                "complete it, or abort it first"
            )
        return _complete(kafka, current, reason=reason, actor=actor)
    champion = model.champion
    evidence: dict[str, Any] = {"manual": True}
    if run is not None:
        evidence["metrics"] = flat_metrics(run.data)
    if full in model.rejected:
        evidence["overrides_rejection"] = model.rejected[full]
    return _publish(
        kafka,
        ModelPromoted(
            model=model_name,
            version=full,
            run_id=run_id,
            previous_version=champion.data.version if champion else None,
            reason=reason,
            actor=actor,
            evidence=evidence,
            cause=run.id if run else None,
            artifact=artifact,
            dataset=dataset,
        ),
    )


def _complete(
    kafka: KafkaConfig, current: Event[ModelTraffic], *, reason: str, actor: str
) -> Event:
    """End a rollout with its candidate promoted: `model.traffic` completed, then the
    `model.promoted` (returned) that downstream subscribers see."""
    done = rollouts.completed(current.data, reason=reason, actor=actor, cause=current.id)
    ended = wrap(done, source=SOURCE, causation=current)
    promoted = wrap(rollouts.promotion(done, ended.id), source=SOURCE, causation=ended)
    _send(kafka, ended, promoted)
    return promoted


def start_rollout(
    kafka: KafkaConfig,
    model_name: str,
    version: str,
    *,
    strategy: Strategy,
    reason: str,
    actor: str,
    weight: int | None = None,
    weights: Mapping[str, int] | None = None,
    steps: list[int] | None = None,
    criteria: TrafficCriteria | None = None,
) -> Event[ModelTraffic]:
    """Start a rollout of `version` against the serving champion: a canary (the candidate's
    weight, then `steps` up to 100, decided by the workflow's analysis; default steps
    [weight, 100]), a shadow (a copy of every request), or an A/B experiment (weights held).
    Everything is checked before the one `model.traffic` event is published."""
    plan = _plan(strategy, weight, steps)  # the arguments alone, before the log is read
    state = read_state(kafka, DECIDING)
    model = _model(state, model_name)
    full, run, promoted = _version(model, version)
    champion = model.champion
    if champion is None:
        raise RolloutConflict(
            f"model {model_name} has no serving version to roll {full} out against: promote "
            "one first"
        )
    stable = champion.data.version
    if full == stable:
        raise RolloutConflict(
            f"model {model_name}: {full} is the version serving now; a {strategy} needs another"
        )
    current = model.rollout
    if current is not None:
        t: ModelTraffic = current.data
        raise RolloutConflict(
            f"model {model_name}: a {t.strategy} rollout of {t.candidate} is in progress "
            f"(rollout {t.rollout_id}, weights {t.weights}); promote {t.candidate} or abort "
            "it first"
        )
    candidate_weight, planned = plan
    split = {stable: 100 - candidate_weight, full: candidate_weight}
    if weights:
        split = _weights(weights, model, stable, full, strategy)
        if strategy == "canary" and (steps or weight is not None):
            if split[full] != planned[0]:
                raise InvalidRollout(
                    f"the weights give {full} {split[full]}%, the first step is {planned[0]}%"
                )
        elif strategy == "canary":  # the weights give the first step
            planned = [split[full], 100]
    artifact, dataset, run_id = _origin(run, promoted, model_name, full)
    failure = _load_failure(kafka, model_name, full, artifact.sha256)
    if failure is not None:
        raise RolloutConflict(f"model {model_name} version {full} cannot be loaded: {failure}")
    rollout_id = new_event_id()
    traffic = ModelTraffic(
        model=model_name,
        rollout_id=rollout_id,
        strategy=strategy,
        status="started",
        stable=stable,
        candidate=full,
        weights={v: w for v, w in split.items() if w or v == stable},
        shadow=strategy == "shadow",
        step=0,
        steps=planned,
        criteria=criteria or TrafficCriteria(),
        reason=reason,
        actor=actor,
        run_id=run_id,
        artifact=artifact,
        dataset=dataset,
        cause=run.id if run else None,
    )
    problem = inconsistency(traffic)
    if problem is not None:
        raise InvalidRollout(f"model {model_name}: {problem}")
    event = wrap(traffic, source=SOURCE, event_id=rollout_id)
    _send(kafka, event)
    return event


def _plan(strategy: str, weight: int | None, steps: list[int] | None) -> tuple[int, list[int]]:
    """The candidate's first weight and the steps, from the arguments of a strategy."""
    if strategy == "shadow":
        if weight is not None or steps:
            raise InvalidRollout("a shadow answers no caller: it takes no weight and no steps")
        return 0, []
    if strategy == "ab":
        if steps:
            raise InvalidRollout("an A/B experiment holds its weights: it takes no steps")
        if weight is None:
            return 50, []
        if not 0 < weight < 100:
            raise InvalidRollout(f"an A/B weight is between 1 and 99 percent, not {weight}")
        return weight, []
    if strategy != "canary":
        raise InvalidRollout(f"unknown strategy {strategy!r}: canary, shadow or ab")
    if steps:
        if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
            raise InvalidRollout(f"steps {steps}: ascending percents between 1 and 100")
        if steps[-1] != 100:
            raise InvalidRollout(f"steps {steps}: a canary's last step is 100")
        if len(steps) < 2:
            raise InvalidRollout("a canary needs a step below 100 before 100")
        if weight is not None and weight != steps[0]:
            raise InvalidRollout(f"the canary weight {weight} is not the first step {steps[0]}")
        return steps[0], list(steps)
    weight = 10 if weight is None else weight
    if not 0 < weight < 100:
        raise InvalidRollout(f"a canary weight is between 1 and 99 percent, not {weight}")
    return weight, [weight, 100]


def _weights(
    weights: Mapping[str, int], model: Model, stable: str, candidate: str, strategy: str
) -> dict[str, int]:
    """Explicit weights by version (a unique prefix will do), checked."""
    if strategy == "shadow":
        raise InvalidRollout("a shadow answers no caller: it takes no weights")
    versions = set(model.runs) | {p.data.version for p in model.promotions}
    out: dict[str, int] = {stable: 0, candidate: 0}
    for name, value in weights.items():
        full = resolve(model.name, name, versions, kind="model", error=UnknownModel)
        if full not in out:
            raise InvalidRollout(
                f"weights name {full}, which is neither the serving version {stable} nor the "
                f"candidate {candidate}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            raise InvalidRollout(f"the weight of {full} is a percent between 0 and 100: {value}")
        out[full] = value
    total = sum(out.values())
    if total != 100:
        raise InvalidRollout(f"weights {dict(weights)} sum to {total}, not 100")
    if not 0 < out[candidate] < 100:
        raise InvalidRollout(f"the candidate's weight is between 1 and 99: {out[candidate]}")
    return out


def _load_failure(kafka: KafkaConfig, model: str, version: str, sha256: str) -> str | None:
    """Why replicas could not load that artifact of the version, when one reported a failure
    and none has loaded it since (None otherwise): a canary of it would serve nowhere."""
    outcome: dict[str, str | None] = {}

    def fold(item: Positioned) -> None:
        update: DeploymentUpdated = item.event.data
        if update.model != model or update.version != version:
            return
        if update.artifact_sha256 not in (None, sha256):
            return
        if update.status == "loaded":
            outcome["failure"] = None
        elif update.status == "failed" and not (update.error or "").startswith(
            "the object store could not be reached"
        ):
            outcome["failure"] = f"replica {update.replica}: {update.error or 'failed'}"

    with LogView(kafka, ["deployment.updated"], on_event=fold, name="rollout check") as view:
        view.catch_up()
    return outcome.get("failure")


def abort(kafka: KafkaConfig, model_name: str, *, reason: str, actor: str) -> Event[ModelTraffic]:
    """End the rollout in progress with all weight back on the stable version."""
    state = read_state(kafka, DECIDING)
    model = _model(state, model_name)
    current = model.rollout
    if current is None:
        raise RolloutConflict(f"model {model_name} has no rollout in progress")
    event = wrap(
        rollouts.aborted(current.data, reason=reason, actor=actor, cause=current.id),
        source=SOURCE,
        causation=current,
    )
    _send(kafka, event)
    return event


def traffic(kafka: KafkaConfig, model_name: str) -> Event[ModelTraffic] | None:
    """The model's newest `model.traffic` event (its rollout in progress, or the last one)."""
    state = read_state(kafka, ("model.promoted", "model.traffic"))
    return _model(state, model_name).traffic


def comparison(kafka: KafkaConfig, current: Event[ModelTraffic]) -> rollouts.Decision | None:
    """How the versions of a rollout in progress compare so far on the streams' windows of
    its current step (`rollout.compare`: the canary's analysis, nothing published); None once
    the rollout ended (its last event carries the analysis that ended it)."""
    if not current.data.active:
        return None
    with LogView(kafka, ["serving.accuracy", "serving.metrics"], name="traffic comparison") as view:
        items = sorted(view.catch_up(), key=lambda i: i.position)
    metrics = [i.event for i in items if i.topic == "serving.metrics"]
    accuracy = [i.event for i in items if i.topic == "serving.accuracy"]
    return rollouts.compare(current, rollouts.merge(metrics, accuracy))


def rollback(
    kafka: KafkaConfig, model_name: str, *, to: str | None, reason: str, actor: str
) -> Event:
    """Roll back by hand: to `to`, or to the previous good version."""
    state = read_state(kafka, DECIDING)
    model = _model(state, model_name)
    champion = model.champion
    if champion is None:
        raise NothingToRollBack(f"model {model_name} has never been promoted")
    if to is None:
        target = model.previous_good()
        if target is None:
            raise NothingToRollBack(
                f"model {model_name}: no earlier good version than {champion.data.version}"
            )
        to = target.data.version
    full, run, promoted = _version(model, to)
    if full == champion.data.version:
        raise NothingToRollBack(f"model {model_name}: {full} is already serving")
    artifact, dataset, run_id = _origin(run, promoted, model_name, full)
    evidence: dict[str, Any] = {"manual": True, "from": champion.data.version, "to": full}
    events: list[Event] = []
    current = model.rollout
    if current is not None:  # a rollback ends the rollout in progress first
        evidence["aborted_rollout"] = current.data.rollout_id
        events.append(
            wrap(
                rollouts.aborted(current.data, reason=reason, actor=actor, cause=current.id),
                source=SOURCE,
                causation=current,
            )
        )
    events.append(
        wrap(
            ModelPromoted(
                model=model_name,
                version=full,
                run_id=run_id,
                previous_version=champion.data.version,
                reason=reason,
                actor=actor,
                evidence=evidence,
                rollback=True,
                cause=champion.event_id,
                artifact=artifact,
                dataset=dataset,
            ),
            source=SOURCE,
        )
    )
    _send(kafka, *events)
    return events[-1]


def _origin(
    run: Event[TrainingCompleted] | None, promoted: ModelPromoted | None, model: str, version: str
) -> tuple[Artifact, Any, str | None]:
    if run is not None:
        data: TrainingCompleted = run.data
        return data.artifact, data.dataset, data.run_id
    if promoted is not None and promoted.artifact is not None:
        return promoted.artifact, promoted.dataset, promoted.run_id
    raise UnknownModel(f"model {model}@{version}: no artifact in the log to load it from")


def list_pipelines(kafka: KafkaConfig, state: State | None = None) -> list[dict[str, Any]]:
    """Every pipeline's newest revision (what is in force)."""
    state = state or read_state(kafka, ("pipeline.defined",))
    return [
        p.defined.model_dump(mode="json", exclude={"source"}) | {"event_id": p.event_id}
        for _, p in sorted(state.pipelines.items())
    ]

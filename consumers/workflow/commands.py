"""Manual decisions and the pipeline listing, shared by the CLI (`mlbus models promote|
rollback`, `mlbus pipelines list`) and the HTTP API. A manual promotion or rollback is a
`model.promoted` like the policy's, with the user as actor; it carries the artifact and
dataset of the version (from its `training.completed`, or from an earlier promotion of it),
so serving can load it. Reads `training.completed`, `model.promoted`, `model.rejected` (and
`pipeline.defined` for the listing); writes `model.promoted`. No service needs to run.

The model listing is not here: it is a query of the lineage store (the composition root
serves it), which does not replay the log per request.
"""

from __future__ import annotations

from typing import Any

from mlbus.consumers.workflow.policy import flat_metrics
from mlbus.consumers.workflow.state import Model, State, read_state
from mlbus.errors import Conflict, UnknownModel
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.refs import resolve
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.training import Artifact, TrainingCompleted


class NothingToRollBack(Conflict):
    """The model has no earlier good version."""


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


def _publish(kafka: KafkaConfig, payload: ModelPromoted) -> Event:
    event = wrap(payload, source="mlbus/cli")
    with EventProducer(kafka, source="mlbus/cli") as producer:
        producer.send(event)
        producer.flush()
    return event


#: What a manual decision is checked against. Read from the log, not from the lineage store:
#: the decision must see the log as it is when it is written (a version trained or promoted a
#: moment ago, the champion a promotion just replaced), and a projection may lag behind it.
DECIDING = ("training.completed", "model.promoted", "model.rejected")


def promote(kafka: KafkaConfig, model_name: str, version: str, *, reason: str, actor: str) -> Event:
    """Promote a version by hand (it then serves, whatever the policy said)."""
    state = read_state(kafka, DECIDING)
    model = _model(state, model_name)
    full, run, promoted = _version(model, version)
    artifact, dataset, run_id = _origin(run, promoted, model_name, full)
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
    return _publish(
        kafka,
        ModelPromoted(
            model=model_name,
            version=full,
            run_id=run_id,
            previous_version=champion.data.version,
            reason=reason,
            actor=actor,
            evidence={"manual": True, "from": champion.data.version, "to": full},
            rollback=True,
            cause=champion.event_id,
            artifact=artifact,
            dataset=dataset,
        ),
    )


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

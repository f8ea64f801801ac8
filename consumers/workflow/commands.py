"""Manual decisions and listings, shared by the CLI (`mlbus models …`, `mlbus pipelines
list`) and the HTTP API. A manual promotion or rollback is a `model.promoted` like the
policy's, with the user as actor; it carries the artifact and dataset of the version (from
its `training.completed`, or from an earlier promotion of it), so serving can load it.
Everything is read from the log: no service needs to run.
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


def promote(kafka: KafkaConfig, model_name: str, version: str, *, reason: str, actor: str) -> Event:
    """Promote a version by hand (it then serves, whatever the policy said)."""
    state = read_state(kafka)
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
            model=model_name, version=full, run_id=run_id,
            previous_version=champion.data.version if champion else None, reason=reason,
            actor=actor, evidence=evidence, cause=run.id if run else None, artifact=artifact,
            dataset=dataset,
        ),
    )  # fmt: skip


def rollback(
    kafka: KafkaConfig, model_name: str, *, to: str | None, reason: str, actor: str
) -> Event:
    """Roll back by hand: to `to`, or to the previous good version."""
    state = read_state(kafka)
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
            model=model_name, version=full, run_id=run_id,
            previous_version=champion.data.version, reason=reason, actor=actor,
            evidence={"manual": True, "from": champion.data.version, "to": full},
            rollback=True, cause=champion.event_id, artifact=artifact, dataset=dataset,
        ),
    )  # fmt: skip


def _origin(
    run: Event[TrainingCompleted] | None, promoted: ModelPromoted | None, model: str, version: str
) -> tuple[Artifact, Any, str | None]:
    if run is not None:
        data: TrainingCompleted = run.data
        return data.artifact, data.dataset, data.run_id
    if promoted is not None and promoted.artifact is not None:
        return promoted.artifact, promoted.dataset, promoted.run_id
    raise UnknownModel(f"model {model}@{version}: no artifact in the log to load it from")


def list_models(kafka: KafkaConfig, state: State | None = None) -> list[dict[str, Any]]:
    """Every model with its versions (runs and promotions) and its champion."""
    state = state or read_state(kafka)
    out = []
    for name, model in sorted(state.models.items()):
        champion = model.champion
        promoted = {p.data.version for p in model.promotions}
        rolled_back = model.rolled_back()
        versions = []
        for version in sorted(set(model.runs) | promoted):
            run = model.runs.get(version)
            data: TrainingCompleted | None = run.data if run else None
            status = (
                "champion" if champion and version == champion.data.version
                else "rolled back" if version in rolled_back
                else "promoted before" if version in promoted
                else "rejected" if version in model.rejected
                else "candidate"
            )  # fmt: skip
            versions.append({
                "version": version, "status": status,
                "run_id": data.run_id if data else None,
                "trained_at": run.time.isoformat() if run and run.time else None,
                "dataset": data.dataset.model_dump() if data else None,
                "metrics": flat_metrics(data) if data else {},
                "rejected": model.rejected.get(version),
            })  # fmt: skip
        out.append({
            "model": name,
            "champion": None if champion is None else {
                "version": champion.data.version, "since": champion.time.isoformat(),
                "actor": champion.data.actor, "reason": champion.data.reason,
                "rollback": champion.data.rollback,
                "policy": champion.data.policy.model_dump() if champion.data.policy else None,
                "event_id": champion.event_id,
            },
            "versions": versions,
        })  # fmt: skip
    return out


def list_pipelines(kafka: KafkaConfig, state: State | None = None) -> list[dict[str, Any]]:
    """Every pipeline's newest revision (what is in force)."""
    state = state or read_state(kafka, ("pipeline.defined",))
    return [
        p.defined.model_dump(mode="json", exclude={"source"}) | {"event_id": p.event_id}
        for _, p in sorted(state.pipelines.items())
    ]

"""Payloads of `model.promoted`, `model.rejected` and `deployment.updated`: which version
serves, why, and where it was loaded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, JsonValue

from mlbus.schemas.base import DatasetRef, Name, NonEmpty, Payload, PolicyRef, Sha256
from mlbus.schemas.training import Artifact


class ModelPromoted(Payload):
    model: Name
    version: NonEmpty
    run_id: str | None = None
    previous_version: str | None = None
    reason: NonEmpty
    actor: NonEmpty = Field(description="who decided: a user, or the workflow's policy")
    policy: PolicyRef | None = None
    evidence: dict[str, JsonValue] = {}
    rollback: bool = False
    cause: str | None = Field(default=None, description="id of the event that caused this one")
    artifact: Artifact | None = Field(
        default=None, description="what to load: copied from the run's training.completed"
    )
    dataset: DatasetRef | None = Field(default=None, description="the version it was trained on")


class ModelRejected(Payload):
    model: Name
    version: NonEmpty
    run_id: str | None = None
    reason: NonEmpty
    actor: NonEmpty
    policy: PolicyRef | None = None
    champion_version: str | None = None
    evidence: dict[str, JsonValue] = {}


class DeploymentUpdated(Payload):
    model: Name
    version: NonEmpty
    replica: NonEmpty
    status: Literal["loaded", "failed", "unloaded"]
    load_seconds: float | None = None
    artifact_sha256: Sha256 | None = None
    error: str | None = None

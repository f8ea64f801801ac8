"""Payloads of the `training.*` topics: requests, and what a training worker reports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import Field

from mlbus.schemas.base import DatasetRef, Name, NonEmpty, Part, Payload, Sha256

HyperValue = float | int | str | bool


class EarlyStopping(Part):
    metric: NonEmpty = "validation.loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(default=3, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class Split(Part):
    """Fractions of the rows held out for validation and test (deterministic by seed)."""

    validation: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.15, ge=0.0, lt=1.0)


class SweepPoint(Part):
    sweep_id: NonEmpty
    index: int = Field(ge=0)
    size: int = Field(ge=1)
    deadline: datetime | None = Field(
        default=None,
        description="when the sweep's runs still without an outcome are declared failed "
        "(a training.failed with error_type DeadlineExceeded, published by the workflow); "
        "None: the workflow's default after the first request",
    )


#: What a model learns: a class per row, or a number per row.
Task = Literal["classification", "regression"]


class FamilyOrigin(Part):
    """Where a model family's code came from: the installed distribution that declared it
    (entry-point group `mlbus.families`) or the `module:callable` it was named by. The
    model server builds the family from the same distribution and version, or refuses."""

    reference: NonEmpty = Field(description="entry point value or module:callable")
    distribution: str | None = Field(default=None, description="installed distribution name")
    version: str | None = Field(default=None, description="the distribution's version")
    digest: str | None = Field(
        default=None, description="sha256 of the family's source files (sha256:<hex>)"
    )


class SearchTrial(Part):
    """The trial of a hyperparameter search a request is (search.requested names the search)."""

    search_id: NonEmpty
    number: int = Field(ge=0)


class TrainingRequested(Payload):
    model: Name
    dataset: DatasetRef
    family: NonEmpty = Field(description="model family from the trainer's registry (mlp, cnn…)")
    hyperparameters: dict[str, HyperValue] = {}
    seed: int = 0
    max_epochs: int = Field(default=10, ge=1)
    early_stopping: EarlyStopping | None = None
    split: Split = Split()
    device: str | None = Field(default=None, description="cpu, cuda, cuda:N; None = automatic")
    requested_by: str | None = None
    pipeline: str | None = None
    sweep: SweepPoint | None = None
    task: Task | None = Field(
        default=None, description="None = the family's first task (classification if none)"
    )
    loss: Literal["mse", "huber"] | None = Field(
        default=None, description="regression loss; None = mse (classification: cross-entropy)"
    )
    family_origin: FamilyOrigin | None = Field(
        default=None, description="the plugin family's origin as the requester resolved it"
    )
    trial: SearchTrial | None = None
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="trainer workers that train this run together (data parallel); "
        "docs/distributed.md",
    )


class TrainingStarted(Payload):
    run_id: NonEmpty
    model: Name
    request_id: NonEmpty = Field(description="event id of the training.requested")
    dataset: DatasetRef
    worker: NonEmpty
    attempt: int = Field(default=1, ge=1)
    resumed_from_epoch: int | None = None
    rendezvous: str | None = Field(
        default=None,
        description="host:port of the run's c10d store when it trains on several workers",
    )


class TrainingProgress(Payload):
    run_id: NonEmpty
    model: Name
    epoch: int = Field(ge=0)
    max_epochs: int = Field(ge=1)
    metrics: dict[str, float]
    samples_per_second: float = Field(ge=0.0)


class Artifact(Part):
    uri: NonEmpty
    sha256: Sha256
    format: NonEmpty = "safetensors"
    model_card_uri: str | None = None
    size_bytes: int | None = None


class CodeVersion(Part):
    package_version: NonEmpty
    git_commit: str | None = None


class TrainingCompleted(Payload):
    run_id: NonEmpty
    model: Name
    version: NonEmpty = Field(description="the model version this run produced")
    request_id: NonEmpty
    family: NonEmpty
    dataset: DatasetRef
    artifact: Artifact
    metrics: dict[str, dict[str, float]] = Field(
        description="split (train, validation, test) → metric → value"
    )
    confusion_matrix: list[list[int]] | None = None
    labels: list[str] | None = None
    hyperparameters: dict[str, HyperValue] = {}
    seed: int = 0
    epochs: int = Field(ge=0)
    code: CodeVersion
    torch_version: str | None = None
    device: str | None = None
    duration_seconds: float = Field(ge=0.0)
    peak_memory_bytes: int | None = None
    task: Task | None = Field(default=None, description="None: classification")
    family_origin: FamilyOrigin | None = Field(
        default=None, description="the plugin family the trainer built (None: built in)"
    )
    input_shape: list[int] | None = Field(
        default=None, description="one sample's input shape ([64], [1, 8, 8])"
    )
    world_size: int = Field(default=1, ge=1, description="workers that trained the run")


#: `error_type` of the `training.failed` the workflow publishes for a sweep's run that had no
#: outcome by the sweep's deadline. Final for the sweep: an outcome that comes later does not
#: replace it.
DEADLINE_EXCEEDED = "DeadlineExceeded"

#: `error_type` of the `training.failed` that ends a trial its search's pruner stopped.
PRUNED = "Pruned"

_RUNS = uuid.UUID("0d6f3b8e-3c1e-4a7e-9a55-7f2d8c1b6e42")


def run_id_for(request_id: str) -> str:
    """The run id of the run a `training.requested` asks for (uuid5 of its event id): every
    worker that takes the request, and the workflow declaring it failed, name the same run."""
    return str(uuid.uuid5(_RUNS, request_id))


class TrainingFailed(Payload):
    run_id: NonEmpty
    model: Name
    request_id: NonEmpty
    reason: NonEmpty
    retryable: bool
    error_type: str | None = None
    epoch: int | None = None
    pruned: bool = Field(
        default=False,
        description="the run was stopped by its search's pruner (error_type Pruned); `epoch` "
        "is the last epoch it trained",
    )

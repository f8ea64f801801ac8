"""Payload of `pipeline.defined`: a pipeline definition as applied (`mlbus pipelines apply`).
The workflow manager acts on the newest revision of each pipeline, so the policy in force at
any time is itself in the log."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from mlbus.schemas.base import Name, NonEmpty, Part, Payload
from mlbus.schemas.search import SearchPlan
from mlbus.schemas.training import EarlyStopping, FamilyOrigin, HyperValue, Split, Task


class Threshold(Part):
    """An absolute bar a candidate must clear: `metric op value`, e.g. test.accuracy >= 0.95.
    Metrics are the trainer's `split.metric` names: test.accuracy, inference.latency_p95_ms…"""

    metric: NonEmpty
    op: Literal[">=", "<="] = ">="
    value: float


class PromotionPolicy(Part):
    name: NonEmpty
    version: int = Field(default=1, ge=1)
    metric: NonEmpty = Field(default="test.accuracy", description="compared with the champion's")
    mode: Literal["max", "min"] = "max"
    margin: float = Field(default=0.0, ge=0.0, description="how much better than the champion")
    thresholds: list[Threshold] = []


class RollbackPolicy(Part):
    enabled: bool = True
    alerts: list[NonEmpty] = Field(
        default=[],
        description="alert rules that may trigger a rollback, named explicitly (error_rate, "
        "latency_p99, accuracy, rmse); empty = none. Drift (psi) only alerts, never rolls "
        "back",
    )
    min_interval_seconds: float = Field(
        default=600.0, ge=0.0, description="at most one automatic rollback per model per interval"
    )


class RolloutPlan(Part):
    """How a pipeline's promoted candidate reaches traffic when a champion serves: a canary
    stepped by analysis of the streams' windows, a shadow, or an A/B experiment (both held
    until ended by hand). Without a plan a promotion takes all traffic at once."""

    strategy: Literal["canary", "shadow", "ab"] = "canary"
    steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(
        default=[10, 50, 100],
        description="canary: the candidate's weights, ascending, ending at 100",
    )
    weight: int | None = Field(
        default=None, gt=0, lt=100, description="ab: the candidate's percent of requests"
    )
    min_samples: int | None = Field(
        default=None,
        ge=1,
        description="candidate requests a canary step needs; None = the workflow's default "
        "(MLBUS_WORKFLOW__ROLLOUT_MIN_SAMPLES)",
    )


class PipelineDefined(Payload):
    name: Name
    revision: int = Field(ge=1, description="1 for the first definition, +1 per change")
    enabled: bool = Field(default=True, description="False: the pipeline was removed")
    dataset: Name = Field(description="train when this dataset gets a new validated version")
    tags: dict[str, str] = Field(default={}, description="only versions carrying these tags")
    model: Name
    family: NonEmpty
    hyperparameters: dict[str, HyperValue] = {}
    sweep: dict[str, list[HyperValue]] = Field(
        default={}, description="hyperparameter → values; one request per point of the grid"
    )
    search: SearchPlan | None = Field(
        default=None,
        description="a hyperparameter search per new version (search.requested) instead of "
        "one run or a grid sweep; its best trial goes through the policy",
    )
    seed: int = 0
    max_epochs: int = Field(default=10, ge=1)
    early_stopping: EarlyStopping | None = None
    split: Split = Split()
    debounce_seconds: float = Field(
        default=0.0, ge=0.0, description="versions within this window trigger one run, newest"
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        description="a sweep's runs without an outcome this long after it was requested are "
        "declared failed and the sweep is decided on the runs it has; None = the workflow's "
        "default (MLBUS_WORKFLOW__SWEEP_DEADLINE_SECONDS)",
    )
    policy: PromotionPolicy
    rollback: RollbackPolicy = RollbackPolicy()
    rollout: RolloutPlan | None = Field(
        default=None,
        description="roll a promoted candidate out (canary, shadow, A/B) instead of giving it "
        "all traffic at once; used when a champion serves",
    )
    task: Task | None = Field(default=None, description="None = the family's first task")
    family_origin: FamilyOrigin | None = Field(
        default=None,
        description="a plugin family's origin as `pipelines apply` resolved it; the workflow "
        "copies it into each training request",
    )
    loss: Literal["mse", "huber"] | None = Field(default=None, description="regression loss")
    actor: NonEmpty = Field(description="who applied it")
    source: str | None = Field(default=None, description="the definition file as applied")

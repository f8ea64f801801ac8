"""Payloads of the `search.*` topics: a hyperparameter search as requested (its space,
sampler, pruner, objective and budget), the pruner's decisions, and the search's end. The
search's trials are ordinary `training.*` runs whose requests carry a `SearchTrial`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlbus.schemas.base import DatasetRef, Name, NonEmpty, Part, Payload
from mlbus.schemas.training import FamilyOrigin, HyperValue, Split


class Param(Part):
    """One dimension of a search space: a float or int range (linear or log scale, with an
    optional step) or a list of categorical choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[HyperValue] | None = None


class Objective(Part):
    metric: NonEmpty = Field(
        default="validation.accuracy",
        description="`split.metric` of training.progress and training.completed",
    )
    direction: Literal["max", "min"] = "max"


class SearchPlan(Part):
    """A pipeline's `search:` block: each new validated version of its dataset starts this
    search (instead of one run or a grid sweep)."""

    space: dict[str, Param]
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "halving", "none"] = "median"
    objective: Objective = Objective()
    trials: int = Field(ge=1)
    parallel: int = Field(default=1, ge=1)
    timeout_seconds: float | None = Field(default=None, gt=0)


class SearchRequested(Payload):
    search_id: NonEmpty
    model: Name
    dataset: DatasetRef
    family: NonEmpty
    space: dict[str, Param] = Field(description="hyperparameter → its range or choices")
    hyperparameters: dict[str, HyperValue] = Field(
        default={}, description="fixed hyperparameters every trial gets"
    )
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "halving", "none"] = "median"
    objective: Objective = Objective()
    trials: int = Field(ge=1, description="budget: trials requested at most")
    parallel: int = Field(default=1, ge=1, description="trials running at once at most")
    timeout_seconds: float | None = Field(
        default=None, gt=0, description="budget: no trial is requested after this long"
    )
    seed: int = 0
    max_epochs: int = Field(default=10, ge=1)
    split: Split = Split()
    pipeline: str | None = Field(
        default=None, description="the pipeline whose promotion policy judges the best trial"
    )
    requested_by: str | None = None
    family_origin: FamilyOrigin | None = Field(
        default=None,
        description="the plugin family's origin as the requester resolved it (None: built "
        "in); every trial's training.requested carries it",
    )


class TrialPruned(Payload):
    """The pruner stopped a trial after `epoch`: the trainer running it checks for this
    between epochs and ends the run with a `training.failed` that says `pruned`."""

    search_id: NonEmpty
    trial: int = Field(ge=0)
    model: Name
    run_id: NonEmpty
    request_id: NonEmpty
    epoch: int = Field(ge=1, description="the last epoch the decision saw")
    value: float | None = Field(default=None, description="the objective at that epoch")
    pruner: NonEmpty


class SearchCompleted(Payload):
    """A search is over: no trial will be requested any more and every requested trial has
    an outcome. `trials` is how many were requested, fewer than the budget when the
    wall-clock budget ran out first; the workflow decides the search on those."""

    search_id: NonEmpty
    model: Name
    reason: Literal["trials", "timeout"] = Field(
        description="the budget that ended it: every trial requested, or the wall clock"
    )
    trials: int = Field(ge=0, description="trials requested")
    budget: int = Field(ge=1, description="the trials the search could have requested")
    completed: int = Field(default=0, ge=0)
    pruned: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    best_trial: int | None = Field(default=None, description="None: no trial completed")
    best_run_id: str | None = None
    best_value: float | None = Field(default=None, description="the best trial's objective")
    pipeline: str | None = None

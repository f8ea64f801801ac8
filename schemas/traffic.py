"""Payload of `model.traffic`: how a model's requests are split between its stable version
and a candidate being rolled out (canary, shadow, A/B), and why the split changed. Every
change of weights is one event; serving replicas follow the newest one per model.

A rollout starts (`started`), moves through its canary steps (`advanced`), and ends either
in `completed` (the candidate takes all traffic; a `model.promoted` of it follows) or in
`aborted` (all traffic back to the stable version). The analysis that caused a step is in
the event, so the decision can be checked, and replayed, from the log alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, JsonValue

from mlbus.schemas.base import DatasetRef, Name, NonEmpty, Part, Payload, PolicyRef
from mlbus.schemas.training import Artifact

Strategy = Literal["canary", "shadow", "ab"]
TrafficStatus = Literal["started", "advanced", "completed", "aborted"]


class TrafficCriteria(Part):
    """What a canary step must show before it advances (decided from the streams' windows of
    each version since the step began), carried in the event so that a replay of the log
    decides with the same bars whatever the settings are then."""

    min_samples: int = Field(
        default=200,
        ge=1,
        description="candidate requests (not refused for their input) a "
        "step needs before it is decided",
    )
    confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1.0,
        description="of the one-sided tests: candidate worse "
        "than stable on error ratio or on accuracy",
    )
    max_error_ratio: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="abort when the lower bound of the "
        "candidate's server-error ratio (Wilson interval) is above this",
    )
    max_latency_ratio: float = Field(
        default=1.5,
        gt=0.0,
        description="abort when the candidate's latency p99 is above "
        "this multiple of the stable version's (over the same windows)",
    )
    min_labelled: int = Field(
        default=50,
        ge=1,
        description="labelled feedback each version needs before accuracy "
        "is compared (fewer: accuracy is not a criterion of the step)",
    )


class ModelTraffic(Payload):
    model: Name
    rollout_id: NonEmpty = Field(description="the same in every event of one rollout")
    strategy: Strategy = Field(
        description="canary: a share of requests by weight, advanced in steps by analysis; "
        "shadow: the candidate answers a copy of every request, never returned; ab: weights "
        "held for an experiment, never advanced automatically"
    )
    status: TrafficStatus
    stable: NonEmpty = Field(description="the version serving when the rollout started")
    candidate: NonEmpty
    weights: dict[str, Annotated[int, Field(ge=0, le=100)]] = Field(
        description="version → percent of requests it answers; sums to 100; versions are "
        "the stable one and the candidate"
    )
    shadow: bool = Field(default=False, description="the candidate gets a copy of every request")
    step: int = Field(default=0, ge=0, description="index into `steps` of the weights in force")
    steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(
        default=[], description="the candidate's planned weights, ascending, in percent"
    )
    criteria: TrafficCriteria = TrafficCriteria()
    analysis: dict[str, JsonValue] = Field(
        default={},
        description="per-version windows since the step began (samples, error ratio, latency "
        "p99, accuracy) and the checks that caused this change",
    )
    reason: NonEmpty
    actor: NonEmpty = Field(description="who decided: a user, or the workflow")
    policy: PolicyRef | None = None
    run_id: str | None = None
    artifact: Artifact | None = Field(
        default=None, description="the candidate's artifact: what replicas load beside the stable"
    )
    dataset: DatasetRef | None = None
    cause: str | None = Field(default=None, description="id of the event that caused this one")

    def weight(self, version: str) -> int:
        return self.weights.get(version, 0)

    @property
    def active(self) -> bool:
        """Still splitting traffic (not completed or aborted)."""
        return self.status in ("started", "advanced")


def inconsistency(traffic: ModelTraffic) -> str | None:
    """What makes a traffic event unusable (None: nothing). The contract's models carry no
    custom validators (schemas/dicts.py); publishers check with this before they publish,
    and replicas ignore an event it refuses, keeping the weights they had."""
    if traffic.candidate == traffic.stable:
        return f"the candidate {traffic.candidate!r} is the stable version"
    unknown = set(traffic.weights) - {traffic.stable, traffic.candidate}
    if unknown:
        return f"weights name versions outside the rollout: {', '.join(sorted(unknown))}"
    if any(w < 0 or w > 100 for w in traffic.weights.values()):
        return "each weight is a percent between 0 and 100"
    total = sum(traffic.weights.values())
    if total != 100:
        return f"weights sum to {total}, not 100"
    if any(not 0 < s <= 100 for s in traffic.steps) or traffic.steps != sorted(set(traffic.steps)):
        return "steps are ascending percents between 1 and 100"
    if traffic.steps and traffic.step >= len(traffic.steps):
        return f"step {traffic.step} is outside the {len(traffic.steps)} steps"
    if traffic.shadow and traffic.weight(traffic.candidate):
        return "a shadow candidate answers no caller: its weight is 0"
    return None

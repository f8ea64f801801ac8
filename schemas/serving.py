"""Payloads of the serving side: stream inference, the inference log, delayed labels
(feedback), windowed metrics, online accuracy and alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, JsonValue

from mlbus.schemas.base import Name, NonEmpty, Part, Payload, Tensor


class InferenceRequest(Payload):
    request_id: NonEmpty
    model: Name
    version: str | None = Field(default=None, description="None = the serving champion")
    inputs: list[Tensor] = Field(min_length=1)
    reply_topic: str | None = Field(default=None, description="None = inference.results")


class InferenceResult(Payload):
    request_id: NonEmpty
    model: Name
    version: str | None = None
    outputs: list[Tensor] = []
    error: str | None = None
    latency_seconds: float | None = None


class InferenceLogged(Payload):
    request_id: NonEmpty
    model: Name
    version: NonEmpty
    replica: NonEmpty
    latency_seconds: float = Field(ge=0.0)
    ok: bool = True
    error: str | None = None
    status: int | None = Field(
        default=None,
        ge=100,
        le=599,
        description="a failed request's HTTP status: 4xx refused for the client's input (not "
        "a serving error), 5xx failed on the server; absent when ok, and in records of older "
        "servers (whose ok=false counts as a server error)",
    )
    batch_size: int = Field(default=1, ge=0)
    predictions: list[float | int | str] = []
    feature_names: list[str] | None = None
    inputs: list[list[float]] | None = Field(
        default=None, description="compact per-sample input summary used for drift"
    )
    shadow: bool | None = Field(
        default=None,
        description="true: answered by a shadow candidate (model.traffic) on a copy of the "
        "request, logged and compared, never returned to the caller; absent otherwise",
    )
    answered_by: str | None = Field(
        default=None, description="a shadow record's: the version whose answer the caller got"
    )
    agreement: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="a shadow record's: the share of rows where its answer equals the one returned",
    )


class Quantiles(Part):
    p50: float
    p95: float
    p99: float
    mean: float
    max: float


class ServingMetrics(Payload):
    model: Name
    version: NonEmpty
    window_start: datetime
    window_end: datetime
    window: Literal["tumbling", "hopping"] = "tumbling"
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)
    error_rate: float = Field(
        ge=0.0,
        le=1.0,
        description="server-side errors over the requests not refused for their input "
        "(requests - client_errors)",
    )
    client_errors: int = Field(
        default=0, ge=0, description="requests refused for the client's input (4xx): not errors"
    )
    latency_seconds: Quantiles | None = None
    class_distribution: dict[str, int] = {}
    psi: dict[str, float] | None = None
    drift_note: str | None = None
    shadowed: int | None = Field(
        default=None,
        ge=0,
        description="a shadow candidate's window: its answers compared with the ones "
        "returned (inference.logged records with an agreement); absent otherwise",
    )
    agreement: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="a shadow candidate's window: the mean share of rows it answered as the "
        "returned version did, over `shadowed` records",
    )


class ServingAlert(Payload):
    model: Name
    version: NonEmpty
    alert: NonEmpty = Field(description="rule name, e.g. error_rate, latency_p99, psi")
    status: Literal["firing", "resolved"]
    metric: NonEmpty
    value: float
    threshold: float
    windows: int = Field(ge=1, description="consecutive windows the condition held")
    window_end: datetime
    reason: str | None = None
    samples: int | None = Field(
        default=None, ge=0, description="samples the firing windows held (after exclusions)"
    )
    rollback: bool = Field(
        default=True,
        description="false: this rule only alerts (drift), whatever a pipeline's rollback "
        "policy names",
    )
    evidence: dict[str, JsonValue] = Field(
        default={},
        description="the test that fired (minimum samples, interval or noise floor, per-window "
        "figures) and the recent history of the model's other versions on the same metric",
    )


class InferenceFeedback(Payload):
    request_id: NonEmpty = Field(description="the id of the answered request (its response id)")
    model: Name
    label: float | int | str | bool = Field(
        description="the true label (classification) or value (regression)"
    )
    known_at: datetime | None = Field(
        default=None, description="when the truth became known; None = the event's time"
    )
    version: str | None = Field(
        default=None, description="the version that answered, if the sender knows it"
    )


class ServingAccuracy(Payload):
    model: Name
    version: NonEmpty
    window_start: datetime
    window_end: datetime
    labelled: int = Field(ge=0, description="feedback joined with a logged prediction")
    correct: int = Field(default=0, ge=0, description="classification: prediction == label")
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    rmse: float | None = Field(default=None, ge=0.0, description="regression: numeric labels")
    late: int = Field(
        default=0,
        ge=0,
        description="feedback known later than the join horizon after its prediction, or "
        "arriving after its window closed: counted here, not in accuracy",
    )
    unmatched: int = Field(
        default=0,
        ge=0,
        description="feedback whose request id was not in the inference log within the "
        "horizon (unknown, or not sampled)",
    )
    mismatched: int = Field(
        default=0, ge=0, description="feedback whose label type does not fit the prediction"
    )
    duplicates: int = Field(
        default=0, ge=0, description="feedback for a request already labelled (the first counts)"
    )

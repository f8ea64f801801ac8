"""Payloads of the serving side: stream inference, the inference log, windowed metrics and
alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

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
    batch_size: int = Field(default=1, ge=0)
    predictions: list[float | int | str] = []
    feature_names: list[str] | None = None
    inputs: list[list[float]] | None = Field(
        default=None, description="compact per-sample input summary used for drift"
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
    error_rate: float = Field(ge=0.0, le=1.0)
    latency_seconds: Quantiles | None = None
    class_distribution: dict[str, int] = {}
    psi: dict[str, float] | None = None
    drift_note: str | None = None


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

"""Delayed labels through the model server: `POST /v2/models/{name}/feedback` checks a
request's true label against what this replica answered and publishes it to
`inference.feedback` (confirmed by the broker before the answer), where the stream
processors join it with the inference log (streams/feedback.py). Any client may publish to
the topic directly as well.

A replica remembers the last `MEMORY` request ids it answered (model, version, the answer's
classes): feedback for an id it does not know, or for another model, is refused (404), and a
label that is not one of the answering version's classes (400), so nothing is published
that the join could only count as unmatched or mismatched. Behind a load balancer, send the
feedback to the replica that answered (or publish it to the topic).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import EventRef
from mlbus.schemas.serving import InferenceFeedback
from mlbus.serving.errors import InvalidFeedback, MalformedRequest, UnknownRequest

#: Request ids a replica remembers for feedback (about 200 bytes each).
MEMORY = 100_000


class FeedbackRequest(BaseModel):
    """The body of `POST /v2/models/{name}/feedback`."""

    model_config = {"extra": "forbid"}

    request_id: str = Field(min_length=1, description="the `id` of the infer response")
    label: str | int | float | bool = Field(
        description="the true class (one of the model's classes) or value"
    )
    known_at: datetime | None = Field(
        default=None, description="when the truth became known (ISO 8601); default: now"
    )


class FeedbackAccepted(BaseModel):
    request_id: str
    model: str
    version: str = Field(description="the version that answered the request")
    event_id: str = Field(description="the inference.feedback event published")


class Answered:
    """The request ids this replica answered last: id → (model, version, classes)."""

    def __init__(self, size: int = MEMORY) -> None:
        self.size = size
        self._ids: OrderedDict[str, tuple[str, str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, model: str, version: str, classes: np.ndarray) -> None:
        # Every answered request's path: one insert, and one eviction once full.
        with self._lock:
            self._ids[request_id] = (model, version, classes)
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, str, np.ndarray] | None:
        with self._lock:
            return self._ids.get(request_id)


def parse(body: bytes) -> FeedbackRequest:
    try:
        return FeedbackRequest.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise MalformedRequest(f"the feedback body is not JSON: {e}") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise MalformedRequest(f"feedback {where}: {first['msg']}") from None


def check(answered: Answered, model: str, request: FeedbackRequest) -> tuple[str, Any]:
    """The version that answered and the label as the inference log has its classes."""
    found = answered.get(request.request_id)
    if found is None or found[0] != model:
        raise UnknownRequest(
            f"request id {request.request_id!r} was not answered by model {model!r} on this "
            f"replica (it remembers the last {answered.size} requests): send feedback to the "
            "replica that answered, or publish it to inference.feedback"
        )
    _, version, classes = found
    label = request.label
    if len(classes) == 0:  # a regression model: the feedback is the true value
        if isinstance(label, bool) or not isinstance(label, int | float):
            raise InvalidFeedback(
                f"label {label!r} is not a number: {model} version {version} is a regression "
                "model, its feedback is the true value"
            )
        return version, float(label)
    names = {str(c) for c in classes.tolist()}
    text = (
        str(int(label)) if isinstance(label, bool | float) and float(label).is_integer() else None
    )
    if str(label) in names:
        return version, label
    if text is not None and text in names:
        return version, int(label)
    shown = ", ".join(sorted(names)[:20])
    raise InvalidFeedback(f"label {label!r} is not a class of {model} version {version} ({shown})")


class FeedbackDesk:
    """Publishes checked feedback; its producer is made on first use."""

    def __init__(self, kafka: KafkaConfig, source: str) -> None:
        self.kafka = kafka
        self.source = source
        self.answered = Answered()
        self._producer: EventProducer | None = None
        self._lock = threading.Lock()

    def publish(self, model: str, version: str, request: FeedbackRequest, label: Any) -> EventRef:
        """Blocking (run it in a thread): confirmed by the broker, or `DeliveryError`."""
        with self._lock:
            if self._producer is None:
                self._producer = EventProducer(self.kafka, source=self.source)
            ref = self._producer.publish(
                InferenceFeedback(
                    request_id=request.request_id,
                    model=model,
                    label=label,
                    known_at=request.known_at,
                    version=version,
                )
            )
            self._producer.flush(10.0)
            return ref

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(5.0)
                self._producer = None

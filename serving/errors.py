"""The model server's errors. Each subclasses a semantic base of mlbus/errors.py and carries
its HTTP status, which is also what serving/app.py answers (OIP body `{"error", "type"}`);
serving/stream.py answers it as the `error` of an `inference.results` record. Three come from
the kernel, shared with other components: `UnknownModel` (404: no such model on this
replica), `Unauthorized` (401: a control endpoint without the bearer token) and
`PayloadTooLarge` (413: the body is larger than serving.max_body_bytes).

    NotFound          UnknownVersion      404: the model has no such loaded version
                      UnknownRequest      404: feedback for a request id this replica did not
                                          answer (for that model)
    Invalid           InvalidInput        400: a tensor that does not match the model card
                      MalformedRequest    400: not JSON, or not an inference request (or a
                                          request id over serving.max_request_id_bytes)
                      InvalidFeedback     400: a label that is not one of the answering
                                          version's classes
    PayloadTooLarge   TooManyRows         413: more input rows than
                                          serving.max_rows_per_request
    TransientError    NotReady            503: the model is loading (or the server is catching
                                          up with model.promoted), or the server is stopping
    MlbusError        VerificationFailed  500: a promoted version that cannot be served
"""

from __future__ import annotations

from mlbus.errors import Invalid, MlbusError, NotFound, PayloadTooLarge, TransientError

__all__ = [
    "InvalidFeedback",
    "InvalidInput",
    "MalformedRequest",
    "NotReady",
    "PayloadTooLarge",
    "TooManyRows",
    "UnknownRequest",
    "UnknownVersion",
    "VerificationFailed",
]


class UnknownVersion(NotFound):
    """The model is served here, but not in the version asked for."""


class UnknownRequest(NotFound):
    """Feedback for a request id this replica did not answer (for that model)."""


class InvalidFeedback(Invalid):
    """A feedback label that does not fit the version that answered."""


class InvalidInput(Invalid):
    """A tensor that does not fit the model card (name, shape, datatype, values)."""


class MalformedRequest(Invalid):
    """A body that is not JSON, or not an inference request."""


class TooManyRows(PayloadTooLarge):
    """More input rows than one request may carry (serving.max_rows_per_request)."""


class NotReady(TransientError):
    """The model is loading, or the server is stopping: ask again later."""


class VerificationFailed(MlbusError):
    """A promoted version failed its checks (hash, card, warm-up): it is not swapped in."""

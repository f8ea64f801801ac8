"""The model server's errors, each mapped to one HTTP status (serving/app.py) and to the
`error` of an `inference.results` record (serving/stream.py).

    MlbusError
    └── ServingError            a request the server refuses (never a 500)
        ├── UnknownModel        404: no such model on this replica
        ├── UnknownVersion      404: the model has no such loaded version
        ├── InvalidInput        400: a tensor that does not match the model card
        ├── MalformedRequest    400: not JSON, or not an inference request
        ├── PayloadTooLarge     413: the body is larger than serving.max_body_bytes
        ├── Unauthorized        401: a control endpoint without the bearer token
        └── NotReady            503: the model is loading, or the server is stopping
    MlbusError
    └── VerificationFailed      a promoted version that cannot be served (hash, card, warm-up)
"""

from __future__ import annotations

from mlbus.errors import MlbusError


class ServingError(MlbusError):
    status = 400


class UnknownModel(ServingError):
    status = 404


class UnknownVersion(ServingError):
    status = 404


class InvalidInput(ServingError):
    status = 400


class MalformedRequest(ServingError):
    status = 400


class PayloadTooLarge(ServingError):
    status = 413


class Unauthorized(ServingError):
    status = 401


class NotReady(ServingError):
    status = 503


class VerificationFailed(MlbusError):
    """A promoted version failed its checks: it is not swapped in."""

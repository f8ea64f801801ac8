"""The root of mlbus's exception tree, its semantic bases, and the contract's own errors.

They live in the contract, which imports nothing of mlbus, so that the codec and the
catalog can raise them and a client of the HTTP API can tell a 404 from a 409 with the
contract alone. Every class carries the HTTP status the APIs answer it with (`status`);
a component's error subclasses one of these bases and inherits its status. The whole tree,
with the kernel's and the components' classes, is drawn in mlbus/errors.py.
"""

from __future__ import annotations

from typing import ClassVar


class MlbusError(Exception):
    """Root of every error mlbus raises on purpose."""

    #: The HTTP status an API answers this error with (mlbus/http.py). A subclass that is
    #: not one of the semantic bases below is a failure of the server: 500.
    status: ClassVar[int] = 500


class NotFound(MlbusError):
    """A name, version or object the request refers to does not exist."""

    status = 404


class Invalid(MlbusError):
    """A request, record or argument that can never succeed as given: retrying cannot fix
    it."""

    status = 400


class Conflict(MlbusError):
    """The request is well formed but contradicts the current state."""

    status = 409


class Unauthorized(MlbusError):
    """A request without the bearer token an endpoint requires."""

    status = 401


class TransientError(MlbusError):
    """A failure that may go away if the operation is retried (with backoff)."""

    status = 503


class InvalidEvent(Invalid):
    """A record that cannot be decoded or validated; the consumer loop dead-letters it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownTopic(NotFound):
    """A topic or event type that is not part of the contract."""

"""The trainer's errors that its light modules (the rendezvous a waiting worker runs) raise
without importing torch or Arrow. Reads and writes no topic."""

from __future__ import annotations

from mlbus.errors import Invalid


class InvalidTrainingRequest(Invalid):
    """A request that can never succeed on its data (nulls, one class, bad split): not
    retryable."""

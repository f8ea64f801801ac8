"""HTTP route of the tuning service (mounted by the control-plane app):

GET /searches/{search_id}   a search as the log has it: budget, trials (parameters, the
                            objective per epoch, state, the epoch a pruned one stopped
                            after), counts and the best trial so far; 404 if unknown

Answered from the log (the search topics and the runs' outcomes), so it answers without the
tuning service running: one lookup view per process folds them into the tuning service's own
state (`Book`), and each request reads only what arrived since the one before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from mlbus.consumers.tuning.state import READS, Book
from mlbus.errors import NotFound
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView

Value = float | int | str | bool


class UnknownSearch(NotFound):
    """No `search.requested` with this id on the log."""


class TrialView(BaseModel):
    number: int
    run_id: str
    request_id: str | None
    params: dict[str, Value]
    state: Literal["running", "completed", "failed", "pruned"]
    value: float | None
    epochs: int | None
    pruned_at_epoch: int | None
    intermediate: dict[str, float]


class Best(BaseModel):
    trial: int
    run_id: str
    value: float | None
    params: dict[str, Value]


class Budget(BaseModel):
    trials: int
    parallel: int
    timeout_seconds: float | None


class SearchView(BaseModel):
    search_id: str
    model: str
    dataset: dict[str, str]
    family: str
    sampler: str
    pruner: str
    objective: dict[str, str]
    budget: Budget
    pipeline: str | None
    requested_at: str
    finished: bool
    ended: Literal["trials", "timeout"] | None = None
    """the budget that ended it (its `search.completed`); None while it runs"""
    counts: dict[str, int]
    best: Best | None
    trials: list[TrialView]


class Searches:
    """Every search on the log, kept current for the life of the process: the first lookup
    reads the topics from the beginning, each later one only what arrived since (a lookup
    view gives its partitions back between catch-ups, so an idle one costs nothing).
    Thread-safe; `close()` it."""

    def __init__(self, kafka: KafkaConfig, *, timeout: float = 60.0) -> None:
        self.book = Book()
        self.timeout = timeout
        self._view = LogView(kafka, READS, name="search lookup")
        self._lock = threading.Lock()

    def _current(self) -> Book:
        """The book caught up with the log as it is now (call with the lock held)."""
        self.book.fold(item.event for item in self._view.catch_up(timeout=self.timeout))
        return self.book

    def summary(self, search_id: str) -> dict[str, Any]:
        """The search's summary as of the end of the log now; `UnknownSearch` if absent."""
        with self._lock:
            summary = self._current().summary(search_id, datetime.now(UTC))
        if summary is None:
            raise UnknownSearch(f"no search {search_id!r} on the log")
        return summary

    def summaries(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every search (of `model`), newest request first."""
        with self._lock:
            book, now = self._current(), datetime.now(UTC)
            found = [
                book.summary(s.id, now)
                for s in book.searches.values()
                if model is None or s.request.model == model
            ]
        out = [s for s in found if s is not None]
        out.sort(key=lambda s: (s["requested_at"], s["search_id"]), reverse=True)
        return out

    def close(self) -> None:
        self._view.stop()


class LazySearches:
    """A `Searches` made on first use and kept until `close()` (the control plane's
    shutdown): call it for the instance."""

    def __init__(self, kafka: Callable[[], KafkaConfig]) -> None:
        self._kafka = kafka
        self._made: Searches | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Searches:
        with self._lock:
            if self._made is None:
                self._made = Searches(self._kafka())
            return self._made

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, None
        if made is not None:
            made.close()


def create_router(searches: Callable[[], Searches]) -> APIRouter:
    router = APIRouter(tags=["tuning"])

    @router.get(
        "/searches/{search_id}",
        summary="A hyperparameter search: its trials, pruned epochs and best so far",
        response_model=SearchView,
        responses={404: {"description": "No such search on the log"}},
    )
    def search(search_id: str) -> Any:
        return searches().summary(search_id)

    return router

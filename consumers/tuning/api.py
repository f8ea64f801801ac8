"""HTTP route of the tuning service (mounted by the control-plane app):

GET /searches/{search_id}   a search as the log has it: budget, trials (parameters, the
                            objective per epoch, state, the epoch a pruned one stopped
                            after), counts and the best trial so far; 404 if unknown

Read from the log on each request (the search topics and the runs' outcomes), so it answers
without the tuning service running.
"""

from __future__ import annotations

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
    counts: dict[str, int]
    best: Best | None
    trials: list[TrialView]


def read_search(kafka: KafkaConfig, search_id: str) -> dict[str, Any]:
    """The search's summary as of the end of the log now."""
    book = Book()
    with LogView(kafka, READS, name="search lookup") as view:
        items = view.catch_up(timeout=60)
    for item in sorted(items, key=lambda i: i.event.type != "search.requested"):
        book.apply(item.event)
    summary = book.summary(search_id, datetime.now(UTC))
    if summary is None:
        raise UnknownSearch(f"no search {search_id!r} on the log")
    return summary


def create_router(kafka: Callable[[], KafkaConfig]) -> APIRouter:
    router = APIRouter(tags=["tuning"])

    @router.get(
        "/searches/{search_id}",
        summary="A hyperparameter search: its trials, pruned epochs and best so far",
        response_model=SearchView,
        responses={404: {"description": "No such search on the log"}},
    )
    def search(search_id: str) -> Any:
        return read_search(kafka(), search_id)

    return router

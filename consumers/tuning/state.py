"""What the log says about each search: its request, and per trial the parameters asked,
the objective at every epoch, the pruner's decision and the outcome. Built by folding
`search.requested`, `search.pruned`, `training.requested`, `training.progress`,
`training.completed`, `training.failed` and `search.completed` (only the runs of known
searches are kept), in any order across topics: a restart replays the same events into the
same state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from mlbus.schemas.envelope import Event
from mlbus.schemas.search import SearchCompleted, SearchRequested, TrialPruned
from mlbus.schemas.training import (
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
)
from mlbus.search import trial_run_id

#: What a search's state is folded from (the tuning service, the API and `mlbus tune`).
READS = (
    "search.requested",
    "search.pruned",
    "search.completed",
    "training.requested",
    "training.progress",
    "training.completed",
    "training.failed",
)

Outcome = Literal["running", "completed", "failed", "pruned"]

#: Within one batch read from several topics: searches, then their trials' requests, then
#: everything else (the topics are read in no common order).
_ORDER = {"search.requested": 0, "training.requested": 1}


@dataclass
class Trial:
    number: int
    run_id: str
    request_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    values: dict[int, float] = field(default_factory=dict)  # epoch → objective
    checked: int = 0  # the last epoch the pruner looked at
    pruned_at: int | None = None  # the epoch of the pruner's decision (search.pruned)
    outcome: Outcome = "running"
    value: float | None = None  # the objective of a completed run
    epochs: int | None = None  # epochs a finished run trained
    reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.request_id is not None

    @property
    def finished(self) -> bool:
        return self.outcome != "running"


@dataclass
class Search:
    event: Event[SearchRequested]
    trials: dict[int, Trial] = field(default_factory=dict)
    ended: SearchCompleted | None = None  # the search's end, once on the log

    @property
    def request(self) -> SearchRequested:
        return self.event.data

    @property
    def id(self) -> str:
        return self.request.search_id

    @property
    def started(self) -> datetime:
        # An event without a time (another producer's) counts from when it was read here.
        if self.event.time is None:
            self.event = self.event.model_copy(update={"time": datetime.now(UTC)})
        assert self.event.time is not None
        return self.event.time

    def asked(self) -> list[Trial]:
        return sorted((t for t in self.trials.values() if t.requested), key=lambda t: t.number)

    def running(self) -> list[Trial]:
        return [t for t in self.asked() if not t.finished]

    def timed_out(self, now: datetime) -> bool:
        limit = self.request.timeout_seconds
        return limit is not None and (now - self.started).total_seconds() >= limit

    def exhausted(self, now: datetime) -> bool:
        """No trial will be requested any more."""
        return len(self.asked()) >= self.request.trials or self.timed_out(now)

    def finished(self, now: datetime) -> bool:
        """Over: ended on the log, or no trial will be requested and none is running."""
        return self.ended is not None or (self.exhausted(now) and not self.running())

    def best(self) -> Trial | None:
        done = [t for t in self.asked() if t.outcome == "completed" and t.value is not None]
        if not done:
            return None
        sign = 1.0 if self.request.objective.direction == "max" else -1.0
        return max(done, key=lambda t: (sign * (t.value or 0.0), -t.number))

    def counts(self) -> dict[str, int]:
        out = {"requested": 0, "running": 0, "completed": 0, "pruned": 0, "failed": 0}
        for t in self.asked():
            out["requested"] += 1
            out[t.outcome] += 1
        return out


def objective_of(metrics: dict[str, dict[str, float]], name: str) -> float | None:
    split, _, key = name.partition(".")
    value = metrics.get(split, {}).get(key)
    return None if value is None or math.isnan(value) else value


@dataclass
class Book:
    """Every search on the log, and an index from run id to (search, trial number)."""

    searches: dict[str, Search] = field(default_factory=dict)
    runs: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: trial requests seen before their search (topics are read in no common order)
    early: dict[str, list[Event]] = field(default_factory=dict)

    def trial(self, run_id: str) -> Trial | None:
        where = self.runs.get(run_id)
        if where is None:
            return None
        search = self.searches[where[0]]
        return search.trials.setdefault(where[1], Trial(where[1], run_id))

    def fold(self, events: Iterable[Event]) -> None:
        """Apply a batch read from the log, searches and requests first."""
        for event in sorted(events, key=lambda e: _ORDER.get(e.type, 2)):
            self.apply(event)

    def apply(self, event: Event) -> None:
        data = event.data
        if isinstance(data, SearchRequested):
            if data.search_id in self.searches:
                return
            search = self.searches[data.search_id] = Search(event)
            for n in range(data.trials):
                run = trial_run_id(data.search_id, n)
                self.runs[run] = (data.search_id, n)
                search.trials[n] = Trial(n, run)
                for late in self.early.pop(run, []):
                    self.apply(late)
            return
        if isinstance(data, SearchCompleted):
            ended = self.searches.get(data.search_id)
            if ended is not None and ended.ended is None:
                ended.ended = data
            return
        run_id = self._run_of(data)
        if run_id is None:
            return
        trial = self.trial(run_id)
        if trial is None:
            # A trial requested before its search is known here (the two topics are read
            # in no common order); any other run is not a search's.
            if isinstance(data, TrainingRequested):
                self.early.setdefault(run_id, []).append(event)
            return
        search = self.searches[self.runs[run_id][0]]
        metric = search.request.objective.metric
        if isinstance(data, TrainingRequested):
            trial.request_id = event.id
            trial.params = {k: data.hyperparameters[k] for k in search.request.space}
        elif isinstance(data, TrainingProgress):
            value = data.metrics.get(metric)
            if value is not None and not math.isnan(value):
                trial.values[data.epoch] = value
        elif isinstance(data, TrialPruned):
            trial.pruned_at = data.epoch
            trial.checked = max(trial.checked, data.epoch)
        elif isinstance(data, TrainingCompleted):
            trial.outcome, trial.epochs = "completed", data.epochs
            trial.value = objective_of(data.metrics, metric)
        elif isinstance(data, TrainingFailed) and not data.retryable:
            trial.outcome = "pruned" if data.pruned else "failed"
            trial.epochs, trial.reason = data.epoch, data.reason

    @staticmethod
    def _run_of(data: Any) -> str | None:
        if isinstance(data, TrainingRequested):
            if data.trial is None:
                return None
            return trial_run_id(data.trial.search_id, data.trial.number)
        return getattr(data, "run_id", None)

    def summary(self, search_id: str, now: datetime) -> dict[str, Any] | None:
        """What GET /searches/{id} and `mlbus tune --wait` show."""
        search = self.searches.get(search_id)
        if search is None:
            return None
        best = search.best()
        r = search.request
        return {
            "search_id": search_id,
            "model": r.model,
            "dataset": r.dataset.model_dump(mode="json"),
            "family": r.family,
            "sampler": r.sampler,
            "pruner": r.pruner,
            "objective": r.objective.model_dump(mode="json"),
            "budget": {
                "trials": r.trials,
                "parallel": r.parallel,
                "timeout_seconds": r.timeout_seconds,
            },
            "pipeline": r.pipeline,
            "requested_at": search.started.isoformat(),
            "finished": search.finished(now),
            "ended": search.ended.reason if search.ended is not None else None,
            "counts": search.counts(),
            "best": None
            if best is None
            else {
                "trial": best.number,
                "run_id": best.run_id,
                "value": best.value,
                "params": best.params,
            },
            "trials": [
                {
                    "number": t.number,
                    "run_id": t.run_id,
                    "request_id": t.request_id,
                    "params": t.params,
                    "state": t.outcome,
                    "value": t.value,
                    "epochs": t.epochs,
                    "pruned_at_epoch": t.pruned_at,
                    "intermediate": {str(k): v for k, v in sorted(t.values.items())},
                }
                for t in search.asked()
            ],
        }

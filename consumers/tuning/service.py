"""The tuning service (`mlbus run tuning`): follows `search.requested` and the runs of each
search (`training.requested/progress/completed/failed`, `search.pruned`), asks Optuna for
the next trial while the budget allows and fewer than `parallel` run, and judges every
reported epoch with the search's pruner. Writes `training.requested` (one per trial),
`search.pruned` (one per pruned trial) and `search.completed` (once per search, when no
trial will be requested any more and every requested one has an outcome: after the trials
budget, or after the wall-clock budget with the trials running then finished; it says how
many were requested, which the workflow decides the search on).

Its state is the log: it reads the topics from the beginning on every start (no consumer
group, no store), so a restart rebuilds every study as it was. Effects are idempotent by
event id: a trial's request id is uuid5(search id, trial number) and a prune decision's id
derives from it, and nothing is published whose trial the log already shows requested or
decided; a crash between publishing and seeing the event again republishes the same id,
which every consumer drops as a duplicate.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from mlbus.consumers.tuning.state import READS, Book, Search, Trial
from mlbus.consumers.tuning.study import propose, should_prune
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event
from mlbus.schemas.search import SearchCompleted, TrialPruned
from mlbus.schemas.training import SearchTrial, SweepPoint, TrainingRequested
from mlbus.search import trial_request_id
from mlbus.signals import install_stop_handlers

log = logging.getLogger(__name__)

SOURCE = "mlbus/tuning"
ACTOR = "tuning"
_PRUNED = uuid.UUID("2f0b9d77-5a43-4c47-8e0e-1c7c9a2b4d10")
_COMPLETED = uuid.UUID("8d3e6c1a-0b7f-4e52-9a64-5f2d1c0e7b93")


def prune_id(request_id: str) -> str:
    return str(uuid.uuid5(_PRUNED, request_id))


def completed_id(search_id: str) -> str:
    """The event id of a search's `search.completed`."""
    return str(uuid.uuid5(_COMPLETED, search_id))


class TuningService:
    """Runs every search on the log to its budget. One instance per cluster (decisions are
    idempotent by id, so a second one only duplicates work, never a trial)."""

    def __init__(self, kafka: KafkaConfig, *, source: str = SOURCE, poll: float = 0.2) -> None:
        self.kafka = kafka
        self.source = source
        self.poll = poll
        self.book = Book()
        self._view = LogView(kafka, READS, name="tuning: searches and their runs")
        self._producer: EventProducer | None = None
        self._stopping = threading.Event()
        self.published = 0

    def stop(self) -> None:
        self._stopping.set()

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Catch up (rebuild every search), then follow and decide until stopped."""
        restore = install_stop_handlers(lambda _: self.stop()) if install_signal_handlers else None
        self._producer = EventProducer(self.kafka, source=self.source)
        try:
            self.fold(self._view.catch_up())
            self._resume()
            log.info("tuning: %d searches on the log", len(self.book.searches))
            while not self._stopping.is_set():
                self.step()
                self.fold(self._view.poll(self.poll))
        finally:
            if restore is not None:
                restore()
            self._view.stop()
            self._producer.flush()

    def fold(self, items: list[Any]) -> None:
        self.book.fold(item.event for item in items)

    def _resume(self) -> None:
        """After a restart only the newest epoch of a running trial is judged: the earlier
        ones were let through (a pruned one has its decision on the log)."""
        for search in self.book.searches.values():
            for trial in search.running():
                if trial.pruned_at is None and trial.values:
                    trial.checked = max(trial.checked, max(trial.values) - 1)

    # -- decisions --------------------------------------------------------------------------

    def step(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        for search in list(self.book.searches.values()):
            if search.ended is not None:
                continue
            for trial in search.running():
                self._judge(search, trial)
            while not search.exhausted(now) and len(search.running()) < search.request.parallel:
                self._ask(search)
            if search.finished(now):
                self._complete(search)

    def _complete(self, search: Search) -> None:
        r, counts, best = search.request, search.counts(), search.best()
        self._publish(
            SearchCompleted(
                search_id=search.id,
                model=r.model,
                reason="trials" if counts["requested"] >= r.trials else "timeout",
                trials=counts["requested"],
                budget=r.trials,
                completed=counts["completed"],
                pruned=counts["pruned"],
                failed=counts["failed"],
                best_trial=best.number if best else None,
                best_run_id=best.run_id if best else None,
                best_value=best.value if best else None,
                pipeline=r.pipeline,
            ),
            cause=search.event,
            event_id=completed_id(search.id),
        )
        log.info(
            "tuning: search %s finished: %s; best trial %s (%s)",
            search.id,
            counts,
            best.number if best else None,
            best.value if best else None,
        )

    def _judge(self, search: Search, trial: Trial) -> None:
        if trial.pruned_at is not None or trial.request_id is None:
            return
        for epoch in sorted(e for e in trial.values if e > trial.checked):
            trial.checked = epoch
            if not should_prune(search, trial, epoch):
                continue
            r = search.request
            self._publish(
                TrialPruned(
                    search_id=search.id,
                    trial=trial.number,
                    model=r.model,
                    run_id=trial.run_id,
                    request_id=trial.request_id,
                    epoch=epoch,
                    value=trial.values[epoch],
                    pruner=r.pruner,
                ),
                cause=search.event,
                event_id=prune_id(trial.request_id),
            )
            log.info(
                "tuning: search %s trial %d pruned at epoch %d", search.id, trial.number, epoch
            )
            return

    def _ask(self, search: Search) -> None:
        r = search.request
        number = len(search.asked())
        params = propose(search)
        request = TrainingRequested(
            model=r.model,
            dataset=r.dataset,
            family=r.family,
            family_origin=r.family_origin,
            hyperparameters=r.hyperparameters | params,
            seed=r.seed,
            max_epochs=r.max_epochs,
            split=r.split,
            requested_by=ACTOR,
            pipeline=r.pipeline,
            # A sweep to the workflow: once every trial has an outcome, the best completed
            # one goes through the pipeline's promotion policy, the others are rejected.
            sweep=SweepPoint(sweep_id=search.id, index=number, size=r.trials),
            trial=SearchTrial(search_id=search.id, number=number),
        )
        event_id = trial_request_id(search.id, number)
        self._publish(
            request,
            cause=search.event,
            event_id=event_id,
            subject=f"{search.id}/trial/{number}",
            # Keyed by the trial, not the model: a search's trials spread over the topic's
            # partitions, hence over the trainer workers, and `parallel` trials train at once
            # (keyed by model they would all queue on one partition, for one worker).
            partitionkey=event_id,
        )
        log.info("tuning: search %s trial %d requested: %s", search.id, number, params)

    def _publish(self, data: Any, *, cause: Event, event_id: str, **envelope: Any) -> None:
        """Publish, confirm, and fold into the state at once (the view sees it again later;
        folding is idempotent)."""
        assert self._producer is not None, "the service is not running"
        event = wrap(data, source=self.source, causation=cause, event_id=event_id, **envelope)
        self._producer.send(event)
        self._producer.flush()
        self.published += 1
        self.book.apply(event)

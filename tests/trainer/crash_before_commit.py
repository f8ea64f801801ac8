"""A training worker (`mlbus run trainer`, configured by the environment) that dies by SIGKILL
at the worst moment for exactly-once: its run's outcome is on the broker (inside the open
transaction when transactions are on) and its request's offset is not committed yet."""

from __future__ import annotations

import os
import signal
from typing import Any

from mlbus.kafka import transaction
from mlbus.kafka.consumer import Record
from mlbus.schemas.envelope import Event
from mlbus.trainer import worker

_finish = worker.TrainingWorker._finish


def _die_before_commit(self: transaction.Transactional, producer: Any) -> None:
    producer.flush(30)  # the outcome reaches the broker, uncommitted
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after_publish(self: worker.TrainingWorker, outcome: Event, record: Record) -> None:
    _finish(self, outcome, record)
    if self.transactions is None:  # published and confirmed; the loop has not committed
        os.kill(os.getpid(), signal.SIGKILL)


transaction.Transactional._commit = _die_before_commit  # type: ignore[method-assign]  # the crash point
worker.TrainingWorker._finish = _die_after_publish  # type: ignore[method-assign]  # the crash point

if __name__ == "__main__":
    from mlbus.cli.training import run_trainer
    from mlbus.services import service
    from mlbus.settings import Settings

    run_trainer(service("trainer"), Settings())

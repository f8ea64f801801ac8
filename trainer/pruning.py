"""The prune decisions of hyperparameter searches (`search.pruned`, published by the tuning
service), which the worker checks between the epochs of a search's trial: a run its search
pruned stops at the next epoch boundary and ends with a `training.failed` saying so."""

from __future__ import annotations

from mlbus.errors import MlbusError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.schemas.search import TrialPruned


class Pruned(MlbusError):
    """A search's pruner stopped the run after `epoch` (decided on `decided_at`)."""

    def __init__(self, run_id: str, epoch: int, decided_at: int) -> None:
        super().__init__(
            f"pruned by its search after epoch {decided_at} (stopped after epoch {epoch})"
        )
        self.run_id, self.epoch, self.decided_at = run_id, epoch, decided_at


class PruneWatch:
    """The runs pruned so far: read from the log's start on first use, then whatever has
    arrived at each check (a check never waits)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._view = LogView(kafka, ["search.pruned"], name="prune decisions")
        self._decided: dict[str, int] = {}  # run id → the epoch of the decision

    def decision(self, run_id: str) -> int | None:
        """The epoch after which the search pruned this run, or None."""
        for item in self._view.poll(0):
            data = item.event.data
            if isinstance(data, TrialPruned):
                self._decided.setdefault(data.run_id, data.epoch)
        return self._decided.get(run_id)

    def close(self) -> None:
        self._view.stop()

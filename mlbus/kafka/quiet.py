"""Idle consumers stop fetching where `mlbus up` keeps a journal, and the journal wakes them.

On the embedded broker an idle fetch is not free: the broker looks at every partition it
names a few times a second (docs/broker.md, "What an idle consumer costs"). The journal's
capture (mlbus/journal/capture.py) already looks at every partition, and publishes where it
has each one on disk (durable.json). So a consumer that has read nothing for `QUIET_AFTER`
seconds pauses its partitions and, while it keeps polling (heartbeats, rebalances), checks
that file — a stat per poll when nothing changed — and resumes as soon as the journal has a
record at or past one of its positions. A record then reaches it within the journal's loss
bound (half its fetch wait plus a sync) and one poll: under a second. With no journal (a
real cluster, the tests' broker) nothing changes. `QUIET_AT_MOST` bounds the pause anyway,
so a journal that stops being written costs latency, never a record.

Used by the log view, the consumer loop and the positioned loop, each with its own idea of
its positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from mlbus.journal.format import Captured

#: Seconds without a record after which a consumer stops fetching.
QUIET_AFTER = 2.0
#: Seconds after which a quiet consumer fetches again whatever the journal says.
QUIET_AT_MOST = 10.0

Positions = Mapping[tuple[str, int], int]


class Quiet:
    """The pause of one consumer while idle. `step()` after each poll; `woken()` when
    something else (a rebalance, the loop's own resume) made it fetch again."""

    def __init__(self, journal: str | None) -> None:
        self._captured = Captured(Path(journal)) if journal else None
        self._active = time.monotonic()
        self._since: float | None = None  # paused since then
        self._paused: list[TopicPartition] = []

    @property
    def enabled(self) -> bool:
        return self._captured is not None

    @property
    def quiet(self) -> bool:
        return self._since is not None

    def step(
        self,
        consumer: Consumer,
        active: bool,
        partitions: Callable[[], Sequence[tuple[str, int]]],
        positions: Callable[[], Positions | None],
    ) -> None:
        """After a poll: `active` if it returned anything. `partitions` are the consumer's
        (Kafka topic, partition); `positions` the next offset it will read of each (None: not
        known now, so it keeps fetching)."""
        if self._captured is None:
            return
        now = time.monotonic()
        if active:
            self._active = now
            if self._since is not None:  # fetching again (a rebalance): keep it so
                self._resume(consumer)
            return
        if self._since is None:
            if now - self._active < QUIET_AFTER:
                return
            self._captured.refresh()
            known = positions()
            if known is None or self._captured.beyond(known):
                self._active = now  # the client is about to bring what the journal has
                return
            self._paused = [TopicPartition(t, p) for t, p in partitions()]
            consumer.pause(self._paused)
            self._since = now
        elif now - self._since >= QUIET_AT_MOST:
            self._resume(consumer)
        elif self._captured.refresh():
            known = positions()
            if known is None or self._captured.beyond(known):
                self._resume(consumer)

    def woken(self) -> None:
        """The consumer fetches again, resumed or assigned afresh by its owner."""
        self._since = None
        self._paused = []
        self._active = time.monotonic()

    def resume(self, consumer: Consumer) -> None:
        """Fetch again now (a re-assignment is coming, say)."""
        if self._since is not None:
            self._resume(consumer)

    def _resume(self, consumer: Consumer) -> None:
        if self._paused:
            consumer.resume(self._paused)
        self.woken()

"""Idle consumers stop fetching where `mlbus up` keeps a journal, and the journal wakes them.

On the embedded broker an idle fetch is not free: the broker looks at every partition it
names a few times a second (docs/broker.md, "What an idle consumer costs"). The journal's
capture (mlbus/journal/capture.py) already looks at every partition, and publishes where it
has each one on disk (durable.json). So a consumer that has read nothing for `QUIET_AFTER`
seconds (in a burst of work it fetches as always) pauses its partitions and, while it keeps
polling (heartbeats, rebalances), checks that file — a stat per poll while nothing changes —
and resumes as soon as the journal has a record at or past one of its positions. A record
then reaches it within the journal's loss bound (half its fetch wait, or its watch interval
while it is idle, plus a sync), a poll
(`QUIET_POLL`) and, right after it paused, the end of a fetch still in flight: about a
second at most. So its fetch wait only matters while records flow: at most
`QUIET_FETCH_WAIT_MS` (mlbus/kafka/config.py). `QUIET_AT_MOST` bounds a pause anyway, so a
journal that stops being written costs latency, never a record. With no journal (a real
cluster, the tests' broker) nothing changes, and neither does it where the journal's file
is missing or its `mlbus up` is gone (an embedded broker started by other means in the
same data dir): a consumer goes quiet only while a live capture writes the file.

Used by the log view, the consumer loop and the positioned loop, each with its own idea of
its positions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition

from mlbus.journal.format import Captured

#: Seconds without a record after which a consumer stops fetching: until then it fetches as
#: always (a record waits at most half its fetch wait), as it will in a burst of work.
QUIET_AFTER = 10.0
#: Seconds a consumer fetches after a wake-up by time before it is quiet again.
QUIET_LOOK = 1.0
#: Seconds after which a quiet consumer fetches again whatever the journal says.
QUIET_AT_MOST = 30.0
#: Seconds a quiet consumer's poll waits (it checks the journal after each): a record's
#: wake-up waits up to this on top of the journal's loss bound.
QUIET_POLL = 0.5

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

    def poll_timeout(self, timeout: float) -> float:
        """How long the owner's next poll may wait: at most QUIET_POLL while quiet."""
        return min(timeout, QUIET_POLL) if self._since is not None else timeout

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
            if not self._captured.live():
                self._active = now  # no journal is kept here now: nothing would wake it
                return
            known = positions()
            if known is None or self._captured.beyond(known):
                self._active = now  # the client is about to bring what the journal has
                return
            self._paused = [TopicPartition(t, p) for t, p in partitions()]
            consumer.pause(self._paused)
            self._since = now
        elif now - self._since >= QUIET_AT_MOST:
            self._resume(consumer, positions())
            self._active = now - QUIET_AFTER + QUIET_LOOK  # a look, then quiet again
        elif self._captured.refresh():
            known = positions()
            if known is None or self._captured.beyond(known):
                self._resume(consumer, known)

    def woken(self) -> None:
        """The consumer fetches again, resumed or assigned afresh by its owner."""
        self._since = None
        self._paused = []
        self._active = time.monotonic()

    def resume(self, consumer: Consumer) -> None:
        """Fetch again now (a re-assignment is coming, say)."""
        if self._since is not None:
            self._resume(consumer)

    def _resume(self, consumer: Consumer, positions: Positions | None = None) -> None:
        if self._paused:
            consumer.resume(self._paused)
            # A resumed partition is fetched again only after a delay of librdkafka's (about
            # 0.7 s, measured); a seek to where it stands starts its fetch at once.
            for tp in self._paused if positions else ():
                offset = positions.get((tp.topic, tp.partition)) if positions else None
                if offset is not None:
                    with contextlib.suppress(KafkaException):
                        consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self.woken()

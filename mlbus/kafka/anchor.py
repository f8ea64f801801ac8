"""Log identity: which log a stored position belongs to. A position ("next offset 1000 of
`model.promoted`/0") only means something in the log it was read from; after a topic is
deleted and recreated, or a broker comes back with an empty log, the same offsets name other
records. Reads and writes no topic: the positioned loop (positioned.py) checks anchors, the
stores (the lineage store, the archive) keep them.

The anchor of a partition is the last record the store consumed there: its offset and a
digest of its key, value and timestamp, stored with the position (the same SQL transaction,
the same file). On assignment the loop fetches the record at the anchor's offset: the same
digest at the same offset means the same log; another record, or none (the log ends before
it), means a new log. Why the *last* record and not the first: Kafka's retention deletes a
partition's oldest records, never the newest one of its active segment, so an anchor that
follows the store's position stays readable for as long as the store keeps up. A log
restored byte for byte (each record again at its offset, with its key, value and timestamp)
keeps every anchor valid; a restore that shifts offsets (`mlbus archive restore` into a
cluster whose topics are not empty, say) does not, and is told as a new log.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from mlbus.errors import Conflict
from mlbus.kafka.consumer import Consumed

#: What a service does when a partition's log is not the one its positions belong to:
#: stop (`fail`), rebuild its store from the new log (`rebuild`), or keep what it holds and
#: continue from the new log's beginning (`restart`). Setting `positions.on_new_log`.
OnNewLog = Literal["fail", "rebuild", "restart"]
ON_NEW_LOG: tuple[str, ...] = get_args(OnNewLog)


def record_digest(key: bytes | None, value: bytes | None, timestamp_ms: int | None) -> str:
    """sha256 of a record's key, value and timestamp, each framed (a missing key and an
    empty one differ). Headers are left out: brokers and restores may add their own."""
    digest = hashlib.sha256()
    for part in (key, value):
        if part is None:
            digest.update(b"-")
        else:
            digest.update(b"+%d:" % len(part))
            digest.update(part)
    digest.update(b"t-" if timestamp_ms is None else b"t%d" % timestamp_ms)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Anchor:
    """A record that identifies a partition's log: its offset and `record_digest`."""

    offset: int
    digest: str

    @classmethod
    def of(
        cls, offset: int, key: bytes | None, value: bytes | None, timestamp_ms: int | None
    ) -> Anchor:
        return cls(offset, record_digest(key, value, timestamp_ms))

    @classmethod
    def of_message(cls, message: Consumed) -> Anchor:
        kind, ts = message.timestamp()
        stamp = None if kind == TIMESTAMP_NOT_AVAILABLE else ts
        return cls.of(message.offset(), message.key(), message.value(), stamp)


@dataclass(frozen=True, slots=True)
class Position:
    """A stored position: the next offset to read and the anchor of the log it belongs to
    (None: stored before anchors existed, so unchecked until the next write sets one)."""

    next: int
    anchor: Anchor | None = None


class NewLog(Conflict):
    """A partition's log is not the one a store's positions belong to (topic recreated,
    broker restarted empty, cluster replaced). Names the partition and the choices."""

    def __init__(
        self, service: str, topic: str, partition: int, anchor: Anchor, found: Anchor | None
    ) -> None:
        self.service = service
        self.topic = topic
        self.partition = partition
        self.anchor = anchor
        self.found = found
        if found is None:
            seen = "the log ends before that offset"
        elif found.offset != anchor.offset:
            seen = f"the log has no record there (the next one is at offset {found.offset})"
        else:
            seen = "another record is there"
        super().__init__(
            f"{service}: {topic}/{partition} is a new log: the store's positions belong to a "
            f"log whose record at offset {anchor.offset} is gone ({seen}); the topic was "
            f"recreated or the broker lost its log. Choose: rebuild the store from the new "
            f"log (MLBUS_POSITIONS__ON_NEW_LOG=rebuild) or keep what the store holds and "
            f"continue from offset 0 of the new log (MLBUS_POSITIONS__ON_NEW_LOG=restart)"
        )

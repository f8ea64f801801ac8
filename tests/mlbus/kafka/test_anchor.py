"""Log identity in the positioned loop, against the real broker: positions stored with the
anchor of their log resume on the same log (or a byte-identical copy of it) and are refused
on a new one, with `NewLog` (fail) or a read from the new log's beginning (restart)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pytest

from mlbus.kafka.anchor import Anchor, NewLog, Position, record_digest
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from tests.mlbus.kafka.support import DEADLINE, copy_log, new_log, progress, publish
from tests.mlbus.kafka.test_positioned import FAST, TOPIC

pytestmark = pytest.mark.integration


class AnchoredSink:
    """Rows and positions with anchors, as a store keeps them (one lock: one transaction)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[Partition, int, str]] = []  # (partition, offset, digest)
        self.stored: dict[Partition, Position] = {}
        self.restarted: list[tuple[Partition, Anchor]] = []

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int | Position]:
        with self.lock:
            return {p: self.stored[p] for p in partitions if p in self.stored}

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        with self.lock:
            for p, messages in batch.items():
                self.rows += [(p, m.offset(), Anchor.of_message(m).digest) for m in messages]
                self.stored[p] = Position(positions[p], Anchor.of_message(messages[-1]))

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        pass

    def restart(self, partition: Partition, old: Anchor) -> None:
        with self.lock:
            assert self.stored[partition].anchor == old
            self.restarted.append((partition, old))
            del self.stored[partition]
            self.rows = [r for r in self.rows if r[0] != partition]  # set aside, not spliced


def run(kafka: KafkaConfig, sink: AnchoredSink, group: str, **kwargs: object) -> PositionedLoop:
    loop = PositionedLoop(
        kafka,
        sink,
        group=group,
        topics=[TOPIC],
        name="test sink",
        backoff=FAST,
        **kwargs,  # type: ignore[arg-type]
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            loop.run(stop_at_end=True, install_signal_handlers=False)
        except BaseException as e:  # handed to the test
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        loop.stop()
        thread.join(DEADLINE)
        pytest.fail("the loop did not reach the end of its partitions")
    if errors:
        raise errors[0]
    return loop


def fill(kafka: KafkaConfig, n: int, model: str) -> None:
    publish(kafka, [progress(model=f"{model}{i}", epoch=1, max_epochs=1) for i in range(n)])


def test_the_digest_frames_each_part_and_includes_the_timestamp():
    assert record_digest(None, b"v", 1) != record_digest(b"", b"v", 1)
    assert record_digest(b"ab", b"c", 1) != record_digest(b"a", b"bc", 1)
    assert record_digest(b"k", b"v", 1) != record_digest(b"k", b"v", 2)
    assert record_digest(b"k", b"v", None) != record_digest(b"k", b"v", 0)


def test_the_same_log_and_a_byte_identical_copy_resume_where_the_sink_is(kafka, group):
    fill(kafka, 60, "old")
    sink = AnchoredSink()
    run(kafka, sink, group)
    assert len(sink.rows) == 60

    fill(kafka, 12, "more")
    loop = run(kafka, sink, group)  # the same log: only what is new
    assert loop.stats.records == 12 and len(sink.rows) == 72

    copy = new_log(kafka)
    assert copy_log(kafka, copy, [TOPIC]) == 72
    fill(copy, 6, "after")
    loop = run(copy, sink, group)  # every record at its offset: the same log
    assert loop.stats.records == 6 and loop.stats.new_logs == 0
    assert len(sink.rows) == 78 and not sink.restarted


@pytest.mark.parametrize("size", [30, 120], ids=["shorter", "longer"])
def test_a_new_log_fails_by_default_naming_the_partition_and_the_choices(kafka, group, size):
    fill(kafka, 60, "old")
    sink = AnchoredSink()
    run(kafka, sink, group)
    before = (list(sink.rows), dict(sink.stored))

    fresh = new_log(kafka)
    fill(fresh, size, "new")
    with pytest.raises(NewLog) as raised:
        run(fresh, sink, group)
    error = raised.value
    assert error.topic == TOPIC and (TOPIC, error.partition) in before[1]
    message = str(error)
    assert f"{TOPIC}/{error.partition} is a new log" in message
    assert "ON_NEW_LOG=rebuild" in message and "ON_NEW_LOG=restart" in message
    assert (sink.rows, sink.stored) == before  # nothing of the new log reached the sink


def test_a_new_log_restarts_from_its_beginning_when_told(kafka, group):
    fill(kafka, 60, "old")
    sink = AnchoredSink()
    run(kafka, sink, group)
    old = set(sink.rows)

    fresh = new_log(kafka)
    fill(fresh, 90, "new")
    loop = run(fresh, sink, group, on_new_log="restart")
    assert {p for p, _ in sink.restarted} == {p for p, _, _ in old}
    assert loop.stats.new_logs == len(sink.restarted)
    assert len(sink.rows) == 90 and not set(sink.rows) & old
    # every offset of the new log from 0, once
    by_partition: dict[Partition, list[int]] = {}
    for p, offset, _ in sink.rows:
        by_partition.setdefault(p, []).append(offset)
    assert all(o == list(range(len(o))) for o in by_partition.values())

    loop = run(fresh, sink, group, on_new_log="restart")  # and now it is the sink's log
    assert loop.stats.records == 0 and loop.stats.new_logs == 0

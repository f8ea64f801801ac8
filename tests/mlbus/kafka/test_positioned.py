"""The positioned batch loop's contract, against the real broker: consumption resumes from the
positions the sink returns (not from the group's offsets); a failing write commits nothing and
its batch comes again; a rebalance between two members loses and duplicates nothing at the
sink; Kafka gets the sink's positions after each write."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from confluent_kafka import Consumer, TopicPartition

from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from tests.mlbus.kafka.support import (
    DEADLINE,
    Producing,
    progress,
    publish,
    read_raw,
    wait_until,
)

TOPIC = "training.progress"  # six partitions
FAST = Backoff(initial=0.05, maximum=0.2)


class MemorySink:
    """A sink whose durable state is two dicts under one lock: the rows written and the
    positions after them change together or not at all. Shared by several members, like a
    database."""

    def __init__(self, stored: Mapping[Partition, int] | None = None) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[str, int, int]] = []  # (event type, partition, offset)
        self.writers: Counter[str] = Counter()  # rows written by each member
        self.stored: dict[Partition, int] = dict(stored or {})
        self.asked: list[list[Partition]] = []
        self.calls: list[dict[Partition, list[int]]] = []  # each write's offsets
        self.fail: list[BaseException] = []  # raised by the next writes, in turn
        self.on_retry: list[dict[Partition, int | None]] = []  # committed at each retry

    def member(self, name: str) -> Member:
        return Member(self, name)


class Member:
    """One loop's view of the shared sink (so that rows say who wrote them)."""

    def __init__(self, sink: MemorySink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.released: list[tuple[list[Partition], bool]] = []
        self.committed: Committed | None = None

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int]:
        with self.sink.lock:
            self.sink.asked.append(list(partitions))
            return {p: self.sink.stored[p] for p in partitions if p in self.sink.stored}

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        sink = self.sink
        with sink.lock:
            sink.calls.append({p: [m.offset() for m in ms] for p, ms in batch.items()})
            if len(sink.calls) > 1 and self.committed is not None:
                sink.on_retry.append(self.committed())
            if sink.fail:
                raise sink.fail.pop(0)
            for (event_type, partition), messages in batch.items():
                assert all(m.partition() == partition for m in messages)
                sink.rows += [(event_type, partition, m.offset()) for m in messages]
                sink.writers[self.name] += len(messages)
            for p, end in positions.items():
                assert end == batch[p][-1].offset() + 1
            sink.stored.update(positions)

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        self.released.append((list(partitions), lost))


class Committed:
    """The offsets a group committed for every partition of TOPIC (None: nothing)."""

    def __init__(self, kafka: KafkaConfig, group: str) -> None:
        self.kafka = kafka
        self.group = group

    def __call__(self) -> dict[Partition, int | None]:
        consumer = Consumer({"bootstrap.servers": self.kafka.bootstrap, "group.id": self.group})
        try:
            tps = [TopicPartition(self.kafka.topic(TOPIC), p) for p in range(6)]
            found = consumer.committed(tps, timeout=10)
            return {(TOPIC, tp.partition): tp.offset if tp.offset >= 0 else None for tp in found}
        finally:
            consumer.close()


def fill(kafka: KafkaConfig, n: int) -> dict[Partition, list[int]]:
    """`n` events over every partition of TOPIC; the log's offsets by partition."""
    publish(kafka, [progress(model=f"m{i}", epoch=i + 1, max_epochs=n) for i in range(n)])
    return offsets_in_log(kafka)


def offsets_in_log(kafka: KafkaConfig) -> dict[Partition, list[int]]:
    found: dict[Partition, list[int]] = {}
    for m in read_raw(kafka, kafka.topic(TOPIC)):
        found.setdefault((TOPIC, m.partition()), []).append(m.offset())
    return found


def loop(kafka: KafkaConfig, sink: Member, group: str, **kwargs: object) -> PositionedLoop:
    return PositionedLoop(
        kafka, sink, group=group, topics=[TOPIC], name=sink.name, backoff=FAST, **kwargs
    )  # type: ignore[arg-type]


def run_to_end(positioned: PositionedLoop) -> None:
    done = threading.Thread(
        target=positioned.run, kwargs={"stop_at_end": True, "install_signal_handlers": False}
    )
    done.start()
    done.join(DEADLINE)
    if done.is_alive():
        positioned.stop()
        done.join(DEADLINE)
        pytest.fail("the loop did not reach the end of its partitions")


def commit(kafka: KafkaConfig, group: str, offsets: Mapping[Partition, int]) -> None:
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group})
    try:
        consumer.commit(
            offsets=[TopicPartition(kafka.topic(t), p, o) for (t, p), o in offsets.items()],
            asynchronous=False,
        )
    finally:
        consumer.close()


def test_consumption_resumes_from_the_sinks_positions_not_the_groups(kafka, group):
    log = fill(kafka, 120)
    assert len(log) == 6, "every partition should hold records"
    ends = {p: offsets[-1] + 1 for p, offsets in log.items()}
    # The group says everything was read; the sink says otherwise, and the sink wins.
    commit(kafka, group, ends)
    partitions = sorted(log)
    stored = {
        partitions[0]: 0,
        partitions[1]: ends[partitions[1]] // 2,
        partitions[2]: ends[partitions[2]],
    }
    sink = MemorySink(stored)
    member = sink.member("a")
    positioned = loop(kafka, member, group)
    run_to_end(positioned)

    expected = sorted(
        (t, p, o) for (t, p), offsets in log.items() for o in offsets if o >= stored.get((t, p), 0)
    )
    assert sorted(sink.rows) == expected
    assert len(expected) < 120  # some partitions did resume in the middle or at the end
    assert sorted(p for asked in sink.asked for p in asked) == partitions
    assert sink.stored == ends
    # Step 2 of each checkpoint: Kafka holds the sink's positions after the run.
    assert Committed(kafka, group)() == ends
    assert positioned.stats.records == len(expected)


def test_a_failing_write_commits_nothing_and_its_batch_comes_again(kafka, group):
    log = fill(kafka, 60)
    ends = {p: offsets[-1] + 1 for p, offsets in log.items()}
    sink = MemorySink()
    member = sink.member("a")
    member.committed = Committed(kafka, group)
    sink.fail = [TransientError("the sink is down"), TransientError("still down")]
    positioned = loop(kafka, member, group)
    run_to_end(positioned)

    first, second, third = sink.calls[:3]
    for later in (second, third):  # each retry holds the failed batch, from its first record
        for p, offsets in first.items():
            assert later[p][: len(offsets)] == offsets
    assert sink.on_retry[:2] == [dict.fromkeys(member.committed().keys())] * 2  # none at all
    assert sorted(sink.rows) == sorted((t, p, o) for (t, p), os in log.items() for o in os)
    assert positioned.stats.retries == 2
    assert member.committed() == ends


def test_an_error_that_is_not_transient_ends_the_run_and_the_next_run_writes_the_batch(
    kafka, group
):
    log = fill(kafka, 60)
    sink = MemorySink()
    member = sink.member("a")
    sink.fail = [RuntimeError("a bug in the sink")]
    with pytest.raises(RuntimeError, match="a bug in the sink"):
        loop(kafka, member, group).run(stop_at_end=True, install_signal_handlers=False)
    assert not sink.rows and not sink.stored
    assert set(Committed(kafka, group)().values()) == {None}

    run_to_end(loop(kafka, member, group))
    assert sorted(sink.rows) == sorted((t, p, o) for (t, p), os in log.items() for o in os)


class Running:
    """A loop run in a thread until stopped."""

    def __init__(self, positioned: PositionedLoop) -> None:
        self.loop = positioned
        self.error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(install_signal_handlers=False)
        except BaseException as e:
            self.error.append(e)

    def stop(self) -> None:
        self.loop.stop()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), f"{self.loop.name} did not stop"
        assert not self.error, self.error


@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
def test_a_rebalance_between_two_members_loses_and_duplicates_nothing(kafka, group, strategy):
    sink = MemorySink()
    a, b = sink.member("a"), sink.member("b")
    # Batches cut by age, so that revocations find records buffered and must write them.
    options = {
        "max_bytes": 10_000_000,
        "max_seconds": 0.3,
        "consumer_overrides": {"partition.assignment.strategy": strategy},
    }
    members: list[Running] = []
    try:
        with Producing(kafka, lambda i: progress(model=f"m{i}"), per_batch=30, pause=0.01):
            members.append(Running(loop(kafka, a, group, **options)))
            wait_until(lambda: sink.writers["a"] > 100, "the first member writing")
            members.append(Running(loop(kafka, b, group, **options)))
            wait_until(lambda: sink.writers["b"] > 100, "the second member writing")
            assert any(parts and not lost for parts, lost in a.released), a.released
            members[0].stop()  # it leaves: the second member takes every partition over
            written = sink.writers["b"]
            wait_until(lambda: sink.writers["b"] > written + 300, "the second member going on")
        log = offsets_in_log(kafka)
        total = sum(len(offsets) for offsets in log.values())
        wait_until(lambda: len(sink.rows) >= total, lambda: f"{len(sink.rows)}/{total} written")
        members[1].stop()
    finally:
        for member in members:
            member.loop.stop()
    twice = [row for row, n in Counter(sink.rows).items() if n > 1]
    assert not twice, f"{len(twice)} records written twice, e.g. {twice[:3]}"
    assert sorted(sink.rows) == sorted((t, p, o) for (t, p), os in log.items() for o in os)
    assert sink.stored == {p: offsets[-1] + 1 for p, offsets in log.items()}

"""The journal capture while idle (mlbus/journal/capture.py), against its own real broker:
with every partition read to its end it stops fetching and watches the partitions' ends
instead; a record written then wakes it, and every record — plain batches and
transactions, whose commit markers take offsets that no record has — reaches the journal
exactly once, at its offset, round after round."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from mlbus.journal.capture import Capture
from mlbus.journal.format import read_journal
from tests.mlbus.kafka.support import wait_until

pytestmark = pytest.mark.integration

Offsets = dict[tuple[str, int], list[int]]


def journaled(directory: Path) -> Offsets:
    found: Offsets = defaultdict(list)
    for batch in read_journal(directory):
        found[(batch.topic, batch.partition)] += batch.offsets
    return dict(found)


def test_an_idle_capture_watches_the_ends_and_wakes_for_every_record(
    brokers: Any, tmp_path: Path
) -> None:
    _, kafka = brokers()
    journal = tmp_path / "journal"
    capture = Capture(
        kafka, journal, sync_seconds=0.05, snapshot_seconds=3600.0, watch_ms=100, nice=0
    )
    capture.start()
    expected: Offsets = defaultdict(list)

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        expected[(message.topic(), message.partition())].append(message.offset())

    plain = Producer(kafka.producer() | {"linger.ms": 20})
    transactional = Producer(kafka.common() | {"transactional.id": "idle-capture"})
    transactional.init_transactions(30)
    progress, created = kafka.topic("training.progress"), kafka.topic("dataset.created")

    def caught_up() -> bool:
        return all(
            capture.positions.get(topic, {}).get(partition) == offsets[-1] + 1
            for (topic, partition), offsets in expected.items()
        )

    try:
        kinds = ["plain", "transaction", "plain", "commit alone", "transaction", "plain"]
        for round_, kind in enumerate(kinds):
            wait_until(lambda: capture.idle, f"the capture to go idle (round {round_})")
            looks = capture.watch_looks
            partition = round_ % 3
            if kind == "plain":  # a batch of five on one partition, a record on another topic
                for i in range(5):
                    plain.produce(progress, b"p%d" % i, partition=partition, on_delivery=delivered)
                plain.produce(created, b"c", partition=round_ % 4, on_delivery=delivered)
                plain.flush(30)
            else:  # a transaction: its commit marker is the partition's last batch
                transactional.begin_transaction()
                for i in range(3):
                    transactional.produce(
                        progress, b"t%d" % i, partition=partition, on_delivery=delivered
                    )
                if kind == "commit alone":  # read, idle again, and then the marker comes
                    transactional.flush(30)
                    wait_until(caught_up, lambda: f"the journal at {capture.positions}")
                    wait_until(lambda: capture.idle, "the capture idle in a transaction")
                    looks = capture.watch_looks
                transactional.commit_transaction(30)
            wait_until(caught_up, lambda: f"the journal at {capture.positions}, sent {expected}")
            # It watched the ends while idle (and, for a marker alone, goes idle again in
            # the next round only once its position is past the marker).
            wait_until(lambda n=looks: capture.watch_looks > n, f"round {round_}: a look")
        wait_until(lambda: capture.idle, "the capture to go idle after the last round")
    finally:
        capture.stop()
    assert capture.error is None
    assert journaled(journal) == expected
    assert sum(len(offsets) for offsets in expected.values()) == 3 * 6 + 3 * 3

"""The streams service's aiokafka clients (streams/clients.py) across an embedded broker's
replacement, on real brokers: a consumer follows the broker to its new port through the gate,
a consumer whose broker is gone stops (and closes its connections), and `mlbus up` with the
streams service carries on after a replacement and stops cleanly after it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus.broker import EmbeddedBroker, Gate
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.codec import STRUCTURED_HEADERS
from mlbus.streams.clients import RebootstrapClient, rebootstrapping, stop_consumer
from tests.conftest import unique
from tests.mlbus.journal.test_broker_loss import Platform
from tests.mlbus.test_broker import wait_gone
from tests.streams.support import encoded, history

pytestmark = pytest.mark.integration

TOPIC = "inference.logged"


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)


async def send(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


async def next_value(consumer: AIOKafkaConsumer, timeout: float = 60.0) -> bytes:
    async with asyncio.timeout(timeout):
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                if records:
                    return records[0].value


def test_a_consumer_follows_a_replaced_broker_through_the_gate(tmp_path: Path) -> None:
    """Bootstrapped through the gate, the consumer knows only the first broker's own address;
    once that broker is gone and a new one on another port is behind the gate, it finds the
    new one and reads on."""
    first = EmbeddedBroker(tmp_path / "a", record=False)
    second = EmbeddedBroker(tmp_path / "b", record=False)
    gate = Gate(tmp_path)
    topic = unique("follow")

    async def scenario() -> None:
        bootstrap = gate.bootstrap
        create_topic(bootstrap, topic)
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", retry_backoff_ms=100
        )
        assert isinstance(rebootstrapping(consumer._client), RebootstrapClient)
        await consumer.start()
        try:
            await send(bootstrap, topic, b"before")
            assert await next_value(consumer) == b"before"
            gate.close()
            first.stop()
            # The new broker is empty (no journal here): the topic is made again, then the
            # consumer's next read comes from it.
            gate.open(second.start())
            create_topic(bootstrap, topic)
            consumer.seek(next(iter(consumer.assignment())), 0)
            await send(bootstrap, topic, b"after")
            assert await next_value(consumer) == b"after"
        finally:
            await stop_consumer(consumer)

    try:
        gate.open(first.start())
        asyncio.run(scenario())
    finally:
        gate.close()
        first.stop()
        second.stop()


def test_a_consumer_whose_broker_is_gone_stops_and_closes_its_connections(
    tmp_path: Path,
) -> None:
    """aiokafka's own stop raises CancelledError when a failed fetch is in its retry backoff
    (the module docstring of streams/clients.py), before it closes its connections; faust's
    consumer thread dies of it and the worker's shutdown waits forever. `stop_consumer`
    returns, with every connection closed."""
    broker = EmbeddedBroker(tmp_path, record=False)
    topic = unique("gone")

    async def scenario(bootstrap: str) -> None:
        create_topic(bootstrap, topic)
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=unique("group"),
            enable_auto_commit=False,  # as faust's consumer: the app commits
            auto_offset_reset="earliest",
            retry_backoff_ms=2000,  # a failed fetch sleeps this long: the stop finds it asleep
        )
        await consumer.start()
        await send(bootstrap, topic, b"one")
        assert await next_value(consumer) == b"one"
        broker.stop()
        fetcher = consumer._fetcher
        async with asyncio.timeout(30):  # until a fetch has failed and sleeps its backoff
            while not fetcher._pending_tasks:
                await asyncio.sleep(0.05)
        await stop_consumer(consumer, timeout=10)
        assert consumer._closed
        assert not any(conn.connected() for conn in consumer._client._conns.values())

    asyncio.run(scenario(broker.start()))


def test_mlbus_up_streams_reads_on_after_a_broker_replacement_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """`mlbus up --only streams`: the broker SIGKILLed and replaced from the journal, the
    streams service (same process) commits what is produced after the replacement on the new
    broker, and a stop of `mlbus up` then exits 0 with every service stopped by itself
    (before the supervisor's grace period, which would kill it)."""
    up = Platform(tmp_path / "data", only="streams")
    records = encoded(history(total=600, windows=6))
    half = len(records) // 2
    try:
        up.wait_for(lambda: any("mlbus is up" in line for line in up.lines), "mlbus is up")
        up.wait_for(lambda: up.services()["streams"]["state"] == "ready", "streams ready")
        first = up.state()
        gated = KafkaConfig(bootstrap=first["bootstrap"], embedded=True, gated=True)
        produce(gated, records[:half])
        up.wait_for(lambda: committed(gated) == half, "the first half committed", timeout=90)
        # On disk in the journal before the kill (what it had not captured would be lost:
        # the loss bound, docs/broker.md), so that the new broker's log holds every record.
        up.wait_for(lambda: journaled(up.data_dir) == half, "the first half in the journal")
        # And the group's offsets: the journal snapshots them every second (docs/broker.md,
        # the loss bound), and a broker death inside that second restores the group without
        # them. That case is not this test's: with the offsets lost, the streams service was
        # seen to stay out of its group on the new broker for minutes (an open defect).
        up.wait_for(
            lambda: journaled_offsets(up.data_dir) == half, "the group's offsets in the journal"
        )
        before = up.services()["streams"]["pid"]

        os.kill(int(first["broker_pid"]), signal.SIGKILL)
        wait_gone(int(first["broker_pid"]))
        # The restore and the re-join take several times longer on a loaded machine (a
        # restore of this journal took 10-11 s at load 6-10; the whole test 22-25 s under
        # four busy loops on two cores). Each wait stays well inside pytest's 300 s limit, so
        # that a platform that never gets there fails here, with its output, instead of
        # being killed by the timeout with nothing to read.
        up.wait_for(
            lambda: up.state().get("broker_pid") not in (None, first["broker_pid"]),
            "a new broker behind the gate",
            timeout=60,
        )
        produce(gated, records[half:])
        seen: list[int] = []
        up.wait_for(
            lambda: seen.append(committed(gated)) or seen[-1] == len(records),
            lambda: (
                f"all {len(records)} records committed by the streams service on the new "
                f"broker (last committed sums: {seen[-5:]})"
            ),
            timeout=120,
        )
        assert up.services()["streams"]["pid"] == before, "the streams service was restarted"

        up.proc.send_signal(signal.SIGTERM)
        try:
            # A service the supervisor had to kill (after its 20 s grace) is caught below by
            # the output; the wait itself allows for a loaded machine.
            code = up.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mlbus up still stopping 60 s after SIGTERM:\n{up.output()}")
        up._reader.join(5)
        assert code == 0, up.output()
        out = "".join(up.lines)
        assert "all services stopped cleanly" in out, up.output()
        assert "did not stop" not in out, up.output()
    finally:
        up.close()


def journaled(data_dir: Path) -> int:
    """How many records of inference.logged the journal has on disk (written whole)."""
    try:
        state = json.loads((data_dir / "journal" / "durable.json").read_text())
    except FileNotFoundError:
        return 0
    return sum(state["positions"].get(TOPIC, {}).values())


def journaled_offsets(data_dir: Path, group: str = "mlbus-streams") -> int:
    """The streams group's offsets on inference.logged in the journal's last snapshot."""
    try:
        state = json.loads((data_dir / "journal" / "groups.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(state["groups"].get(group, {}).get(TOPIC, {}).values())


def produce(kafka: KafkaConfig, records: list[tuple[str, bytes]]) -> None:
    producer = Producer(kafka.producer())
    for key, value in records:
        producer.produce(kafka.topic(TOPIC), value, key, headers=STRUCTURED_HEADERS)
    assert producer.flush(60) == 0


def committed(kafka: KafkaConfig, group: str = "mlbus-streams") -> int:
    """The streams service's committed offsets on inference.logged, summed over partitions."""
    consumer = Consumer({**kafka.consumer(group), "enable.auto.commit": False})
    try:
        topic = kafka.topic(TOPIC)
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    except Exception:  # the broker being replaced
        return -1
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in offsets)

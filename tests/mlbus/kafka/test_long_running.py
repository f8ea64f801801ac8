"""Long-running handlers (a training run, say) keep their consumer in its group however
long a record takes, and can give a record back unfinished on shutdown (`Abandon`)."""

from __future__ import annotations

import threading
import time

from mlbus.errors import Abandon
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.schemas.envelope import Event
from tests.mlbus.kafka.support import (
    LoopThread,
    Recorder,
    committed_offset,
    progress,
    publish,
    run_to_end,
    wait_until,
)

# librdkafka's floor is the session timeout (2 s on the embedded broker).
SHORT_POLL_INTERVAL = {"max.poll.interval.ms": 3000}


def test_a_handler_longer_than_the_poll_interval_keeps_the_consumer_in_its_group(kafka, group):
    (ref,) = publish(kafka, [progress(run_id="slow")])
    done: list[str] = []

    def slow(event: Event, record: Record) -> None:
        time.sleep(5)  # beyond max.poll.interval.ms: an ordinary handler would be evicted
        done.append(event.id)

    loop = ConsumerLoop(
        kafka,
        group=group,
        handlers={"training.progress": slow},
        consumer_overrides=SHORT_POLL_INTERVAL,
        long_running=True,
    )
    stats = run_to_end(loop, timeout=60)
    assert done == [ref.id] and stats.handled == 1
    topic = kafka.topic("training.progress")
    partitions = [committed_offset(kafka, group, topic, p) for p in range(6)]
    assert 1 in partitions, f"the slow record's offset was not committed: {partitions}"


def test_abandon_on_stop_gives_the_record_back_uncommitted(kafka, group):
    (ref,) = publish(kafka, [progress(run_id="interrupted")])
    started = threading.Event()

    def patient(event: Event, record: Record) -> None:
        started.set()
        while not record.stopping:
            time.sleep(0.02)
        raise Abandon("checkpointed; another worker continues")

    loop = ConsumerLoop(
        kafka, group=group, handlers={"training.progress": patient}, long_running=True
    )
    running = LoopThread(loop).start()
    wait_until(started.is_set, "the handler to start")
    stats = running.stop()
    assert stats.handled == 0 and stats.deadlettered == 0

    again = Recorder()
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"training.progress": again}))
    assert again.ids == [ref.id], "the abandoned record was not delivered again"


def test_an_exception_in_a_long_running_handler_is_dead_lettered_like_any_other(kafka, group):
    publish(kafka, [progress(run_id="broken")])

    def broken(event: Event, record: Record) -> None:
        raise ValueError("bad hyperparameters")

    loop = ConsumerLoop(
        kafka, group=group, handlers={"training.progress": broken}, long_running=True
    )
    stats = run_to_end(loop)
    assert stats.deadlettered == 1 and stats.handled == 0

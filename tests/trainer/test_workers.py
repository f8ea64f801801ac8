"""Two `mlbus trainer` processes in one consumer group share a sweep of four requests;
one is killed with SIGKILL in the middle of a run. The survivor takes over its partitions
after the session timeout, resumes the interrupted run from its last epoch checkpoint, and
the sweep ends with exactly four `training.completed` events: one per request, distinct
run ids, no event published twice.

Requests are keyed by model name, so one model's sweep lands on one partition and is
trained by one worker, one run after the other. To have two workers really split a sweep,
its four points are published under four model names that fall on four distinct
partitions of `training.requested` (6 partitions): each worker owns three partitions, so
each gets at least one point.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import zlib
from collections import defaultdict

import pytest

from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import decode
from mlbus.schemas.envelope import Event, new_event_id
from mlbus.schemas.training import SweepPoint, TrainingRequested
from tests.mlbus.kafka.support import read_raw, wait_until
from tests.mlbus.test_cli import MLBUS, env, json_lines, mlbus, ok  # noqa: F401 - env: a fixture
from tests.trainer.test_cli import FAST

PARTITIONS = 6  # of training.requested (schemas/catalog.py)
EPOCHS = 6
TOPICS = ("training.started", "training.progress", "training.completed", "training.failed")


class Events:
    """Every event of the training topics, as they arrive (a group-less follower thread)."""

    def __init__(self, kafka):
        self.kafka = kafka
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._reader = TopicReader(kafka, [kafka.topic(t) for t in TOPICS], follow=True)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self):
        for message in self._reader:
            event = decode(
                message.value(),
                message.headers(),
                expected_type=self.kafka.event_type(message.topic()),
            )
            with self._lock:
                self._events.append(event)

    def of(self, event_type, requests=None):
        with self._lock:
            return [
                e
                for e in self._events
                if e.type == event_type and (requests is None or e.data.request_id in requests)
            ]

    def of_request(self, request, run_id):
        """Every event of one request (its run's progress included), in the order read."""
        with self._lock:
            return [
                e
                for e in self._events
                if getattr(e.data, "request_id", None) == request
                or getattr(e.data, "run_id", None) == run_id
            ]

    def stop(self):
        self._reader.stop()
        self._thread.join(10)


def _names_on_distinct_partitions(count, prefix):
    """Model names whose keys librdkafka's default partitioner (consistent_random: CRC32 of
    the key) puts on `count` distinct partitions; checked against the log below."""
    names: dict[int, str] = {}
    for i in range(1000):
        name = f"{prefix}-{i}"
        names.setdefault(zlib.crc32(name.encode()) % PARTITIONS, name)
        if len(names) == count:
            return sorted(names.values())
    raise AssertionError("no such names")


def _worker_id(process):
    return lambda worker: worker.endswith(f":{process.pid}")


@pytest.fixture
def workers(env, tmp_path):  # noqa: F811
    # One torch thread each: two workers share this machine's cores.
    env = env | FAST | {"OMP_NUM_THREADS": "1"}
    started = []

    def start(name, *command):
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        process = subprocess.Popen(
            [MLBUS, *(command or ("trainer",))],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started.append((process, log))
        return process

    yield env, start
    for process, log in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def test_two_workers_split_a_sweep_and_survive_a_sigkill(kafka, workers):
    cli_env, start = workers
    sample = json_lines(ok(mlbus("datasets", "sample", "digits", "--json", env=cli_env)).stdout)[0]
    dataset = DatasetRef(name="digits", version=sample["version"])
    start("validator", "datasets", "validate")  # the workers train validated versions only
    first, second = start("a"), start("b")
    events = Events(kafka)
    try:
        # Both workers in the group before the sweep: a rebalance in the middle of a run
        # would hand a running request to a second worker. A probe round (an unknown family
        # on every partition, failed at once) shows who owns what.
        probes = _names_on_distinct_partitions(PARTITIONS, "probe")
        ids: set[str] = set()

        def both_joined():
            with EventProducer(kafka, source="test") as producer:
                ids.clear()
                for name in probes:
                    probe = TrainingRequested(model=name, family="probe", dataset=dataset)
                    ids.add(producer.publish(probe).id)
            wait_until(
                lambda: len(events.of("training.failed", ids)) == PARTITIONS,
                "the probes to fail",
                timeout=60,
            )
            seen = {e.data.worker for e in events.of("training.started", ids)}
            return any(map(_worker_id(first), seen)) and any(map(_worker_id(second), seen))

        wait_until(both_joined, "both workers to own partitions", timeout=90, interval=1.0)

        sweep = new_event_id()
        names = _names_on_distinct_partitions(4, "sweep")
        with EventProducer(kafka, source="test") as producer:
            requests = {
                producer.publish(
                    TrainingRequested(
                        model=name,
                        family="cnn",
                        dataset=dataset,
                        seed=1,
                        max_epochs=EPOCHS,
                        device="cpu",
                        hyperparameters={"batch_size": 32, "channels": 8},
                        sweep=SweepPoint(sweep_id=sweep, index=i, size=4),
                    ),
                    correlationid=sweep,
                ).id: name
                for i, name in enumerate(names)
            }
        landed = {
            m.partition()
            for m in read_raw(kafka, kafka.topic("training.requested"))
            if m.key().decode() in names
        }
        assert len(landed) == 4, "the sweep's model names did not land on 4 partitions"

        def running():
            """(worker, run id, epoch) of a sweep run with a checkpointed epoch, unfinished."""
            done = {e.data.run_id for e in events.of("training.completed", requests)}
            epochs: dict[str, int] = defaultdict(int)
            for e in events.of("training.progress"):
                epochs[e.data.run_id] = max(epochs[e.data.run_id], e.data.epoch)
            workers = {
                e.data.run_id: e.data.worker for e in events.of("training.started", requests)
            }
            owners = {e.data.worker for e in events.of("training.started", requests)}
            if not (any(map(_worker_id(first), owners)) and any(map(_worker_id(second), owners))):
                return None  # the sweep is not split yet
            for run_id, worker in workers.items():
                if run_id not in done and 1 <= epochs[run_id] < EPOCHS:
                    return worker, run_id, epochs[run_id]
            return None

        worker, interrupted, epoch = wait_until(
            running, "both workers training the sweep", timeout=90, interval=0.1
        )
        victim = first if _worker_id(first)(worker) else second
        survivor = second if victim is first else first
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        wait_until(
            lambda: (
                len({e.data.request_id for e in events.of("training.completed", requests)}) == 4
            ),
            lambda: f"4 completed runs; have {len(events.of('training.completed', requests))}",
            timeout=180,
            interval=0.5,
        )
        assert survivor.poll() is None, "the survivor died"
        completed = events.of("training.completed", requests)
        assert len(completed) == 4, [e.data.run_id for e in completed]
        assert len({e.id for e in completed}) == 4
        assert len({e.data.run_id for e in completed}) == 4
        assert all(e.correlationid == sweep for e in completed)
        assert not events.of("training.failed", requests)
        # The interrupted run was taken over and continued from its checkpoint.
        attempts = [
            e.data for e in events.of("training.started", requests) if e.data.run_id == interrupted
        ]
        assert [a.attempt for a in attempts] == [1, 2]
        assert _worker_id(survivor)(attempts[1].worker)
        assert attempts[1].resumed_from_epoch is not None
        assert attempts[1].resumed_from_epoch >= epoch
        (resumed,) = [e.data for e in completed if e.data.run_id == interrupted]
        assert resumed.epochs == EPOCHS
    finally:
        events.stop()

"""The embedded platform survives a power cut at any moment of the demo flow: 20 times, at a
random moment (dataset registration, training, promotion, inference traffic), every process
of `mlbus up` (the supervisor, the broker, every service) is SIGKILLed at once and the
platform started again on the same data dir. Each time, every record seen on the broker more
than the journal's loss bound before the kill is back at its offset with the same key,
value, headers and timestamp; every group's offsets are back; the champion served before is
served again. At the end no request was trained twice, no version decided twice, and the
lineage store holds one row per record of the log, each the record the log has there.
(The random kill moments come from a printed seed; MLBUS_TEST_SIGKILL_SEED replays them.)"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from mlbus.broker import free_port
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import load_settings
from tests.mlbus.test_cli import clean_env

pytestmark = pytest.mark.integration

KILLS = 20
#: The journal's loss bound (one 500 ms fetch and a 200 ms sync) with a margin for a
#: loaded machine: what was seen this long before the kill must come back.
BOUND = 1.5
#: Group offsets are snapshotted every second on top of that.
GROUP_LAG = BOUND + 1.5
PIPELINE = Path(__file__).resolve().parent / "sigkill.yaml"
MODEL = "digits"

Key = tuple[str, int, int]
Row = tuple[bytes | None, bytes | None, tuple[Any, ...], tuple[int, int]]
_quiet = logging.getLogger("tests.sigkill.librdkafka")  # the killed broker's connection errors


class Observer:
    """Reads every partition of a broker from its start as records arrive, noting when each
    was seen (it had been acknowledged by then), and samples every group's committed offsets
    twice a second."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.records: dict[Key, tuple[Row, float]] = {}
        self.groups: list[tuple[float, dict[str, dict[tuple[str, int], int]]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conf = {"bootstrap.servers": self.bootstrap, "log.connection.close": False}
        consumer = Consumer(
            conf
            | {
                "group.id": "test-observer-unused",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_uncommitted",
                "fetch.wait.max.ms": 50,
                "logger": _quiet,
            }
        )
        admin = AdminClient(conf | {"logger": _quiet})
        assigned: set[tuple[str, int]] = set()
        last_discover = last_groups = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_discover > 1.0:
                    last_discover = now
                    with contextlib.suppress(Exception):
                        topics = admin.list_topics(timeout=2).topics
                        new = [
                            TopicPartition(t, p, OFFSET_BEGINNING)
                            for t, meta in topics.items()
                            if not t.startswith("__")
                            for p in meta.partitions
                            if (t, p) not in assigned
                        ]
                        if new:
                            consumer.incremental_assign(new)
                            assigned |= {(tp.topic, tp.partition) for tp in new}
                if now - last_groups > 0.5:
                    last_groups = now
                    with contextlib.suppress(Exception):
                        sample = group_offsets(admin)
                        self.groups.append((time.monotonic(), sample))
                for m in consumer.consume(1000, timeout=0.1):
                    if m.error() is not None:
                        continue
                    row = (m.key(), m.value(), tuple(m.headers() or ()), m.timestamp())
                    with self._lock:
                        self.records[(m.topic(), m.partition(), m.offset())] = (
                            row,
                            time.monotonic(),
                        )
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self) -> dict[Key, tuple[Row, float]]:
        with self._lock:
            return dict(self.records)

    def events(self, topic: str) -> list[dict[str, Any]]:
        """The CloudEvents of `topic` seen so far, in offset order."""
        rows = sorted((k, r) for k, (r, _) in self.snapshot().items() if k[0] == topic)
        return [orjson.loads(r[1]) for _, r in rows if r[1]]

    def wait_for(self, keys: set[Key], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = keys - self.records.keys()
            if not missing:
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{len(missing)} records not back after the restart, e.g. {min(missing)}"
                )
            time.sleep(0.1)


def group_offsets(admin: AdminClient) -> dict[str, dict[tuple[str, int], int]]:
    out: dict[str, dict[tuple[str, int], int]] = {}
    for listing in admin.list_consumer_groups().result(timeout=5).valid:
        group = listing.group_id
        request = [ConsumerGroupTopicPartitions(group)]
        result = admin.list_consumer_group_offsets(request)[group].result(timeout=5)
        offsets = {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions or []
            if tp.offset >= 0
        }
        if offsets:
            out[group] = offsets
    return out


class Platform:
    """`mlbus up` (every service) on one data dir, started again after each kill."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {"serve": free_port(), "api": free_port(), "metrics": free_port()}
        self.env = clean_env(
            MLBUS_DATA_DIR=str(root),
            MLBUS_SERVING__PORT=str(self.ports["serve"]),
            MLBUS_API__PORT=str(self.ports["api"]),
            MLBUS_STREAMS__METRICS_PORT=str(self.ports["metrics"]),
            COLUMNS="200",
        )
        self.log = root.parent / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.old_broker: int | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlbus", "up"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"`mlbus up` exited with {self.proc.returncode}\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def broker(self, timeout: float = 120) -> str:
        """The new broker's address, as soon as it is announced: after the restore, before
        any service has started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(FileNotFoundError, ValueError):
                state = json.loads((self.root / "broker.json").read_text())
                if state["pid"] != self.old_broker:
                    self.old_broker = int(state["pid"])
                    return str(state["bootstrap"])
            time.sleep(0.02)
        pytest.fail(f"no broker announced within {timeout:.0f}s\n{self.tail()}")

    def services(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError, ValueError):
            status = json.loads((self.root / "services.json").read_text())
            assert self.proc is not None
            if status["pid"] == self.proc.pid:
                return list(status["services"])
        return []

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            services = self.services()
            if services and all(s["state"] == "ready" for s in services):
                return
            time.sleep(0.2)
        pytest.fail(f"services not ready within {timeout:.0f}s\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL every process of the platform at once, as a power cut would stop them."""
        assert self.proc is not None
        pids = {self.proc.pid, *(s["pid"] for s in self.services() if s["pid"])}
        if self.old_broker:
            pids.add(self.old_broker)
        pids |= {c for p in list(pids) for c in _descendants(p)}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        for pid in pids:
            _wait_gone(pid)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(120)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                out.update(children)
                todo += children
    return out


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} still alive after SIGKILL")


class Flow:
    """The demo flow, driven from what the log says: each incarnation of the platform takes
    the next step that the log does not show yet, and sends inference traffic once a model
    is served. Runs in a thread the kill interrupts (errors then are expected)."""

    def __init__(self, platform: Platform, bootstrap: str, observer: Observer, second: bool):
        self.platform = platform
        self.kafka = KafkaConfig(bootstrap=bootstrap, embedded=True)
        self.observer = observer
        self.second = second
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            self._steps()

    def _steps(self) -> None:
        from mlbus.cli.demo_job import _shifted_digits
        from mlbus.consumers.workflow.definitions import apply
        from mlbus.datasets.registry import DatasetRegistry
        from mlbus.datasets.samples import sample_table
        from mlbus.datasets.sources import from_table
        from mlbus.storage import ObjectStore

        if not self.observer.events("pipeline.defined"):
            apply(self.kafka, PIPELINE.read_text(), source=str(PIPELINE), actor="user:test")
        created = {e["data"]["version"] for e in self.observer.events("dataset.created")}
        cfg = load_settings(data_dir=self.platform.root)
        table = None
        if not created:
            table = sample_table("digits")
        elif self.second and len(created) == 1 and promoted(self.observer):
            table = _shifted_digits()
        if table is not None:
            registry = DatasetRegistry(ObjectStore.from_settings(cfg), self.kafka)
            try:
                registry.register(from_table(table, "test"), name="digits", label="label")
            finally:
                registry.close()
        self._traffic()

    def _traffic(self) -> None:
        from mlbus.kafka.producer import EventProducer
        from mlbus.schemas.base import Tensor
        from mlbus.schemas.serving import InferenceRequest

        rows = np.random.default_rng(0).random((8, 64), dtype=np.float32) * 16
        body = {"inputs": [{"name": "input", "shape": [8, 64], "datatype": "FP32",
                            "data": rows.ravel().tolist()}]}  # fmt: skip
        url = f"http://127.0.0.1:{self.platform.ports['serve']}/v2/models/{MODEL}/infer"
        with EventProducer(self.kafka, source="tests/sigkill") as producer:
            while not self.stop.is_set():
                if not promoted(self.observer):
                    self.stop.wait(0.5)
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(url, json=body, timeout=5)
                tensor = Tensor(name="input", shape=[1, 64], datatype="FP32",
                                data=rows[0].tolist())  # fmt: skip
                producer.publish(
                    InferenceRequest(request_id=str(uuid.uuid4()), model=MODEL, inputs=[tensor])
                )
                self.stop.wait(0.1)


def promoted(observer: Observer) -> list[str]:
    return [e["data"]["version"] for e in observer.events("model.promoted")]


def pending(observer: Observer) -> bool:
    """A dataset version not decided yet, or a promoted version not loaded yet."""
    created = observer.events("dataset.created")
    champion = promoted(observer)
    return len(decisions(observer)) < max(1, len(created)) or (
        bool(champion) and champion[-1] not in loaded(observer)
    )


def decisions(observer: Observer) -> set[str]:
    return {
        e["data"]["version"]
        for topic in ("model.promoted", "model.rejected")
        for e in observer.events(topic)
    }


def loaded(observer: Observer) -> list[str]:
    return [
        e["data"]["version"]
        for e in observer.events("deployment.updated")
        if e["data"]["status"] == "loaded"
    ]


def served_version(platform: Platform) -> str | None:
    url = f"http://127.0.0.1:{platform.ports['serve']}/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}  # fmt: skip
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.post(url, json=body, timeout=5)
        if response.status_code == 200:
            return str(response.json()["model_version"])
    return None


def wait_until(condition: Any, what: str, timeout: float, platform: Platform) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        platform._check_running()
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f}s\n{platform.tail()}")
        time.sleep(0.25)


def check_restored(
    before: dict[Key, tuple[Row, float]],
    groups: list[tuple[float, dict[str, dict[tuple[str, int], int]]]],
    killed_at: float,
    bootstrap: str,
    observer: Observer,
) -> None:
    """Right after the restore (no service has started yet): the records seen more than the
    bound before the kill, and the groups' offsets sampled more than the snapshot lag before
    it, are back."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    sampled = [g for t, g in groups if t < killed_at - GROUP_LAG]
    now = group_offsets(admin)
    for group, offsets in (sampled[-1] if sampled else {}).items():
        for tp, offset in offsets.items():
            got = now.get(group, {}).get(tp, -1)
            assert got >= offset, f"group {group} {tp}: offset {got} restored, {offset} before"
    required = {k: row for k, (row, seen) in before.items() if seen < killed_at - BOUND}
    observer.wait_for(set(required), timeout=60)
    after = observer.snapshot()
    differ = [k for k, row in required.items() if after[k][0] != row]
    assert not differ, f"{len(differ)} records differ after the restore, e.g. {min(differ)}"


@pytest.mark.timeout(1200)
def test_twenty_sigkills_of_the_whole_platform_during_the_demo_flow(tmp_path: Path) -> None:
    seed = int(os.environ.get("MLBUS_TEST_SIGKILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (MLBUS_TEST_SIGKILL_SEED reproduces the kill moments)")
    platform = Platform(tmp_path / "data")
    observer: Observer | None = None
    flow: Flow | None = None
    try:
        platform.start()
        bootstrap = platform.broker()
        observer = Observer(bootstrap)
        for kill in range(KILLS):
            platform.wait_ready()
            champion = promoted(observer)
            if champion and champion[-1] in loaded(observer):
                # The champion it served before the kill, served again.
                wait_until(
                    lambda v=champion[-1]: served_version(platform) == v,
                    f"the server answering with {champion[-1]} after kill {kill}",
                    90,
                    platform,
                )
            flow = Flow(platform, bootstrap, observer, second=kill >= KILLS // 2)
            if kill % 4 == 3 and pending(observer):
                # Now and then the flow reaches its next step before the kill.
                seen = len(decisions(observer)) + len(loaded(observer))
                with contextlib.suppress(BaseException):
                    wait_until(
                        lambda s=seen, o=observer: len(decisions(o)) + len(loaded(o)) > s,
                        "a next step",
                        60,
                        platform,
                    )
            time.sleep(rng.uniform(0.3, 6.0))
            platform.kill()
            killed_at = time.monotonic()
            flow.stop.set()
            observer.stop()
            before, groups = observer.snapshot(), list(observer.groups)
            print(f"kill {kill + 1}: {len(before)} records seen, {promoted(observer)} promoted")
            platform.start()
            bootstrap = platform.broker()
            observer = Observer(bootstrap)
            check_restored(before, groups, killed_at, bootstrap, observer)
            # The killed incarnation's flow thread is left to fail on its own (a daemon): a
            # producer closing against a dead broker waits out its timeouts.

        # The flow completes after the last restart: the second dataset version's model is
        # decided, and the champion is what the server answers with.
        platform.wait_ready()
        flow = Flow(platform, bootstrap, observer, second=True)
        wait_until(lambda: len(decisions(observer)) >= 2, "the second decision", 300, platform)
        champion = promoted(observer)[-1]
        wait_until(lambda: served_version(platform) == champion, "champion served", 120, platform)
        flow.stop.set()
        time.sleep(3)  # what the services do with the last records
        log = observer.snapshot()
        assert platform.stop() == 0, platform.tail()
        observer.stop()
        observer = None
    finally:
        if flow is not None:
            flow.stop.set()
        if observer is not None:
            observer.stop()
        platform.close()

    def events(topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(r[1]) for k, (r, _) in sorted(log.items()) if k[0] == topic and r[1]]

    completed = Counter(e["data"]["request_id"] for e in events("training.completed"))
    assert [r for r, n in completed.items() if n > 1] == [], "a request trained twice"
    made = [e for t in ("model.promoted", "model.rejected") for e in events(t)]
    # A rollback promotes an earlier version again: a decision of its own, one per alert.
    decided = Counter(
        (e["data"]["model"], e["data"]["version"]) for e in made if not e["data"].get("rollback")
    )
    assert [d for d, n in decided.items() if n > 1] == [], f"a version decided twice: {decided}"
    rollbacks = Counter(
        (e["data"]["model"], e.get("causationid")) for e in made if e["data"].get("rollback")
    )
    assert [r for r, n in rollbacks.items() if n > 1] == [], (
        f"an alert rolled back twice: {rollbacks}"
    )
    # One lineage row per record, and it is the record the log has at that offset.

    def event_id(key: Key) -> Any:
        found = log.get(key)
        event = orjson.loads(found[0][1]) if found and found[0][1] else None
        return event.get("id") if isinstance(event, dict) else None

    with contextlib.closing(sqlite3.connect(platform.root / "metadata.db")) as db:
        rows = db.execute('select id, topic, partition, "offset" from events').fetchall()
    positions = Counter((t, p, o) for _, t, p, o in rows)
    assert [p for p, n in positions.items() if n > 1] == [], "two lineage rows for one record"
    # (Rows of what the services did after the last read, at the stop, are not checked.)
    ends: dict[tuple[str, int], int] = {}
    for t, p, o in log:
        ends[(t, p)] = max(o, ends.get((t, p), -1))
    checked = [(i, t, p, o) for i, t, p, o in rows if o <= ends.get((t, p), -1)]
    wrong = [(i, t, p, o) for i, t, p, o in checked if event_id((t, p, o)) != i]
    assert wrong == [], f"lineage rows for records the log does not have: {wrong[:3]}"

"""The embedded log of `mlbus up`: the broker behind its gate (mlbus/broker.py), the journal
capture, and a new broker restored from the journal whenever the old one dies or holds more
memory than retention lets it keep — while the services run on, reconnecting on their own.

Reads and writes every topic of the broker (through restore and capture); services reach the
broker only through the gate, which is closed while a new broker is restored
(docs/broker.md, "Broker loss" and "Retention").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mlbus.broker import EmbeddedBroker, Gate, free_port, resident_bytes
from mlbus.errors import JournalError
from mlbus.journal.capture import Capture
from mlbus.journal.restore import Restored, restore
from mlbus.journal.retention import Trimmed, shortest_retention, trim
from mlbus.kafka.admin import TopicStatus, apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings

Report = Callable[[str], None]


@dataclass
class Cycle:
    """One new broker put in place: why, what the journal lost to retention, what came back."""

    reason: str
    trimmed: Trimmed
    restored: Restored
    seconds: float


class Keeper:
    """`start()` once, `check()` from the thread that started it (the main thread: the
    broker and gate die with `mlbus up` only if forked from it), `stop()` at the end."""

    def __init__(
        self,
        cfg: Settings,
        *,
        report: Report = lambda _: None,
        rotate_bytes: int | None = None,
        check_seconds: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.directory = cfg.data_dir / "journal"
        self.report = report
        self.rotate_bytes = rotate_bytes or cfg.journal.rotate_mb * 1024 * 1024
        self.check_seconds = check_seconds
        self.gate = Gate(cfg.data_dir)
        self.broker: EmbeddedBroker | None = None
        self.capture: Capture | None = None
        self.kafka: KafkaConfig | None = None
        """the broker's own address (restore and capture); clients use `bootstrap`"""
        self.cycles: list[Cycle] = []
        self.records = 0
        """records captured by every capture of this run"""
        self._floor = 0
        """the broker's resident memory right after its restore"""
        self._last_check = 0.0
        self._trimmed_at = time.monotonic()
        self._ports: set[int] = set()

    @property
    def bootstrap(self) -> str:
        return self.gate.bootstrap

    def start(self) -> tuple[list[TopicStatus], Restored]:
        """The first broker: the journal trimmed by retention, the catalog's topics, the
        journal restored, capture started, then the gate opened and its address recorded
        for the services and commands."""
        trimmed = trim(self.directory)
        self._trimmed_at = time.monotonic()
        if trimmed.records:
            self.report(
                f"journal: retention dropped {trimmed.records:,} expired records "
                f"({trimmed.seconds:.2f}s)"
            )
        return self._bring_up()

    def check(self) -> Cycle | None:
        """Restart a dead broker, or rotate one past its memory bound; JournalError if the
        capture failed (no journal, no durability: the platform stops)."""
        if self.capture is not None and not self.capture.alive():
            raise JournalError(f"the journal stopped: {self.capture.error!r}")
        assert self.broker is not None
        if not self.broker.alive():
            code = self.broker.process.returncode if self.broker.process else None
            return self.cycle(f"the embedded broker exited (code {code})", lost=True)
        if not self.gate.alive():  # stateless: opened again in front of the same broker
            assert self.broker.process is not None
            self.report("the broker's gate stopped: opening it again")
            self.gate.close()
            self.gate.open(self.broker.bootstrap, broker_pid=self.broker.process.pid)
        now = time.monotonic()
        if now - self._last_check < self.check_seconds:
            return None
        self._last_check = now
        assert self.broker.process is not None
        rss = resident_bytes(self.broker.process.pid)
        if rss >= self.rotate_bytes and rss >= 2 * self._floor and self._expired_since():
            return self.cycle(
                f"rotation: the broker holds {rss / 2**20:.0f} MB "
                f"(bound {self.rotate_bytes / 2**20:.0f} MB)",
                lost=False,
            )
        return None

    def cycle(self, reason: str, *, lost: bool) -> Cycle:
        """Put a new broker in place: close the gate, stop capture (draining the old broker
        first unless it is `lost`), trim the journal by retention, restore it into a new
        broker, resume capture, open the gate."""
        started = time.monotonic()
        self.report(f"{reason}: closing the gate, restoring a new broker from the journal")
        self.gate.close()
        if not lost and self.capture is not None and self.capture.alive():
            # Clients keep their direct connections to the old broker: capture is let catch
            # up, then the broker goes at once; what it acknowledged after capture's last
            # read is lost, as when a broker dies (docs/broker.md, "Retention").
            self._caught_up(self.capture, timeout=15.0)
        if self.broker is not None:
            self.broker.stop(timeout=0)  # memory storage: nothing to flush, no grace needed
        self._stop_capture(lost=True)
        trimmed = trim(self.directory)
        self._trimmed_at = time.monotonic()
        _, restored = self._bring_up()
        done = Cycle(reason, trimmed, restored, time.monotonic() - started)
        self.cycles.append(done)
        self.report(
            f"new broker at {self.bootstrap} in {done.seconds:.2f}s: restored "
            f"{restored.records:,} records and the offsets of {restored.groups} groups"
            + (f"; retention dropped {trimmed.records:,} records" if trimmed.records else "")
        )
        for clamp in restored.clamped:
            self.report(f"group offset past the journal's end, set back: {clamp}")
        return done

    def stop(self) -> None:
        """After the services: capture drains the broker (their last records and offsets),
        then the gate and the broker stop."""
        try:
            self._stop_capture(lost=self.broker is None or not self.broker.alive())
        finally:
            self.gate.close()
            if self.broker is not None:
                self.broker.stop()

    # -- internals --------------------------------------------------------------------------

    def _expired_since(self) -> bool:
        """True once the shortest retention has passed since the last trim: what the broker
        took in since then has begun to expire (a rotation sooner would free nothing)."""
        shortest = shortest_retention(self.directory)
        return shortest is not None and time.monotonic() - self._trimmed_at >= shortest / 1000

    def _bring_up(self) -> tuple[list[TopicStatus], Restored]:
        cfg = self.cfg
        # A port no client has seen: clients reach a new broker only through the gate.
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        self.broker = EmbeddedBroker(cfg.data_dir, port=port, record=False)
        self.broker.start()
        self.kafka = KafkaConfig.from_settings(cfg, bootstrap=self.broker.bootstrap)
        statuses = apply_topics(self.kafka)
        restored = restore(self.kafka, self.directory)
        self.capture = Capture(
            self.kafka,
            self.directory,
            positions=restored.positions,
            sync_seconds=cfg.journal.sync_ms / 1000,
            snapshot_seconds=cfg.journal.snapshot_seconds,
            fetch_wait_ms=cfg.journal.fetch_wait_ms,
            watch_ms=cfg.journal.watch_ms,
            nice=cfg.journal.nice,
        )
        self.capture.start()
        assert self.broker.process is not None
        self._floor = resident_bytes(self.broker.process.pid)
        self.gate.open(
            self.broker.bootstrap, broker_pid=self.broker.process.pid
        )  # only now may anyone else reach it
        return statuses, restored

    def _caught_up(self, capture: Capture, timeout: float) -> bool:
        """Wait until capture has read into the last batch of every partition of the broker:
        its drain then has the rest locally. The broker's "latest" offset is the last
        batch's base offset + 1 (docs/broker.md), so capture has reached a partition's last
        batch once its position is at least that. Capture may need a second or more to
        fetch a partition it was just assigned: stopping it sooner (its drain ends after
        half a second without records) would leave the new partition's records out."""
        assert self.kafka is not None
        from confluent_kafka import Consumer, KafkaException, TopicPartition
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient(self.kafka.admin())
        reader = Consumer(self.kafka.consumer(None))
        try:
            metadata = admin.list_topics(timeout=5.0)
            partitions = [
                TopicPartition(name, p)
                for name, topic in metadata.topics.items()
                if not name.startswith("__") and topic.error is None
                for p in topic.partitions
            ]
            latest = {}
            for tp in partitions:
                _, high = reader.get_watermark_offsets(tp, timeout=5.0)
                if high > 0:
                    latest[(tp.topic, tp.partition)] = high
        except KafkaException:
            return False
        finally:
            reader.close()
        while time.monotonic() < deadline:
            if all(
                capture.positions.get(t, {}).get(p, 0) >= high for (t, p), high in latest.items()
            ):
                return True
            time.sleep(0.05)
        return False

    def _stop_capture(self, *, lost: bool) -> None:
        capture, self.capture = self.capture, None
        if capture is None:
            return
        if not lost and capture.alive() and not self._caught_up(capture, timeout=15.0):
            self.report("journal: capture did not reach every partition's end in 15s")
        # No timeout that could leave it writing while a restore reads the journal.
        if lost:
            capture.abandon(timeout=120.0)
        else:
            capture.stop(timeout=120.0)
        self.records += capture.records
        if capture.error is not None:
            raise JournalError(f"the journal stopped: {capture.error!r}")

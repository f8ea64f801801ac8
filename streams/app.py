"""The faust-streaming app of `mlbus streams`: `inference.logged` fed to the window engine
a whole fetch at a time (streams/transport.py: faust's per-record stream is far slower,
docs/streams.md), one changelog-backed table holding the engine's state per (model, version) and
each partition's watermark, a timer that closes the windows of idle partitions, and the
Prometheus exporter. Writes serving.metrics, serving.alert and mlbus.deadletter (through
the processor). Beside it, the feedback join (streams/feedback.py) reads inference.logged and
inference.feedback and writes serving.accuracy and its alerts.

Why one table of per-series records rather than faust's windowed tables: faust closes its
windows on the wall clock (`window.stale(ts, time.time())`), so a replay from offset 0 would
close every old window at once and a live run would close them by arrival; the engine
closes them on event time instead (streams/windows.py), and keeps each series' open windows,
offset and alert state in one record, so one changelog write per series per batch is
atomic. Table recovery is faust's own (changelog read back on assignment).

Embedded broker (docs/broker.md): `producer_max_batch_size=1` (recovery is silently wrong
otherwise; it costs little here: one changelog record per series per batch), short group
timeouts, no exactly_once. The changelog topic is created before the app starts with the
partitions of `inference.logged` (faust requires them equal, and a topic auto-created by
the embedded broker would get 4).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from faust.types import TP

from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import TOPICS, min_insync_replicas
from mlbus.settings import StreamsSettings
from mlbus.streams.connection import faust_broker_settings
from mlbus.streams.drift import Baselines, baseline_view
from mlbus.streams.exporter import Exporter
from mlbus.streams.feedback import FeedbackProcessor
from mlbus.streams.processor import EVENT_TYPE, StreamProcessor
from mlbus.streams.transport import App
from mlbus.streams.windows import Engine, WindowConfig

log = logging.getLogger(__name__)

TABLE = "series"
TICK_SECONDS = 0.5
#: First threshold of the garbage collector while the app runs. At Python's 700 a fetch of
#: a few thousand records (each decoded into a dozen containers) set off collections that
#: promoted the fetch's records into the older generations, and the full collections that
#: followed walked every object the imports left: a visible share of the time per record.
#: A catching-up fetch holds tens of thousands of records (three or four tracked objects
#: each, alive until the fetch is applied): at 10,000 one fetch still set off a dozen
#: collections, each walking the fetch's live records again; at 100,000 about one.
GC_THRESHOLD = 100_000
_gc_frozen = False


def tune_gc() -> None:
    """Raise the collector's first threshold to GC_THRESHOLD and, once per process, move
    what exists when the app starts (imports, faust's services, the app: nothing it will
    retire) out of the collector's reach with `gc.freeze()`, so that a full collection
    walks only what was made since. Collected first, so that no garbage is frozen."""
    global _gc_frozen
    threshold, *older = gc.get_threshold()
    if 0 < threshold < GC_THRESHOLD:  # 0: automatic collection is off, and stays so
        gc.set_threshold(GC_THRESHOLD, *older)
    if not _gc_frozen:
        _gc_frozen = True
        gc.collect()
        gc.freeze()


@dataclass(frozen=True)
class StreamsOptions:
    app_id: str
    data_dir: Path
    metrics_port: int = 0
    web_port: int = 0
    idle_seconds: float | None = None
    loglevel: str = "warning"


def changelog_topic(app_id: str) -> str:
    return f"{app_id}-{TABLE}-changelog"


def ensure_changelog(kafka: KafkaConfig, app_id: str) -> int:
    """Create the table's changelog with the partitions of inference.logged (idempotent);
    its replication factor and `min.insync.replicas` follow the rule of the catalog's
    topics (schemas/catalog.py), so acks=all writes succeed on any cluster size. Returns the
    replication factor of new topics on this cluster."""
    spec = TOPICS[EVENT_TYPE]
    admin = AdminClient(kafka.admin())
    name = changelog_topic(app_id)
    try:
        metadata = admin.list_topics(timeout=10)
    except KafkaException as e:
        raise TransientError(f"cannot reach Kafka at {kafka.bootstrap}: {e}") from None
    replication = spec.replication_on(len(metadata.brokers))
    existing = metadata.topics.get(name)
    if existing is not None and existing.error is None:
        if len(existing.partitions) != spec.partitions:
            raise TransientError(
                f"changelog {name} has {len(existing.partitions)} partitions, "
                f"{EVENT_TYPE} has {spec.partitions}: delete it (tables are rebuilt by replay)"
            )
        return replication
    # Compaction is what a changelog wants on Kafka (the embedded broker stores but does
    # not enforce it: recovery then reads every record, which stays correct).
    config = {
        "cleanup.policy": "compact",
        "min.insync.replicas": str(min_insync_replicas(replication)),
    }
    futures = admin.create_topics(
        [NewTopic(name, spec.partitions, replication, config=config)], operation_timeout=30
    )
    for future in futures.values():
        try:
            future.result()
        except KafkaException as e:
            if "exist" not in str(e).lower():
                raise TransientError(f"cannot create {name}: {e}") from None
    return replication


class StreamsApp:
    """The composed app: faust app, engine, processor, exporter, baseline follower."""

    def __init__(
        self,
        kafka: KafkaConfig,
        settings: StreamsSettings,
        options: StreamsOptions,
        on_new_log: str = "fail",
    ) -> None:
        self.kafka = kafka
        self.options = options
        self.config = WindowConfig.from_settings(settings, options.idle_seconds)
        self.baselines = Baselines()
        self.exporter = Exporter(retired=self.baselines.retired, lag=self._lag)
        self.baselines.on_promoted = self.exporter.sweep
        self.follower = baseline_view(kafka, self.baselines)
        self.feedback = FeedbackProcessor(kafka, settings) if settings.feedback else None
        partitions = TOPICS[EVENT_TYPE].partitions
        options.data_dir.mkdir(parents=True, exist_ok=True)
        app_settings: dict[str, Any] = {
            "store": "memory://",
            "datadir": str(options.data_dir),
            "processing_guarantee": "at_least_once",
            "producer_max_batch_size": 1,
            "topic_partitions": partitions,
            # What faust creates itself (its leader topic); the changelog is created by
            # ensure_changelog, replicated as the catalog's topics are.
            "topic_replication_factor": TOPICS[EVENT_TYPE].replication_on(1),
            "consumer_auto_offset_reset": "earliest",
            "web_enabled": options.web_port > 0,
            "web_port": options.web_port or 6066,
            "broker_commit_interval": 1.0,
            "table_cleanup_interval": 3600.0,
        }
        # The user's Kafka settings (MLBUS_KAFKA__*) win over mlbus's, as for every client.
        app_settings.update(faust_broker_settings(kafka))
        self.app = App(options.app_id, **app_settings)
        self.table = self.app.Table(
            TABLE, default=None, partitions=partitions, key_type=str, value_type=None
        )
        self.engine = Engine(
            self.config,
            self.baselines,
            on_metrics=self.exporter.on_metrics,
            on_alert=self.exporter.on_alert,
            on_late=self.exporter.on_late,
        )
        self.processor = _FaustProcessor(
            kafka,
            self.engine,
            self.table,
            self.exporter,
            group=options.app_id,
            app=self.app,
            topic=kafka.topic(EVENT_TYPE),
            on_new_log=on_new_log,
        )
        self._wire()

    def _wire(self) -> None:
        app, processor = self.app, self.processor
        topic = app.topic(
            self.kafka.topic(EVENT_TYPE),
            key_serializer="raw",
            value_serializer="raw",
            partitions=TOPICS[EVENT_TYPE].partitions,
        )

        # Records of inference.logged reach the processor a whole fetch at a time through
        # the transport (streams/transport.py), which commits their offsets after the
        # handler; faust's per-record stream is far slower (docs/streams.md). The agent declares the
        # subscription (and so the partitions the table is co-partitioned with); a record
        # reaching it means the transport is not the batching one: a loud failure, not a
        # silently much slower app.
        async def on_batch(batches: dict[TP, list[Any]]) -> None:
            # A partition restarted on a new log is sought back to offset 0: its records of
            # this fetch are dropped, and so not committed by the transport.
            for partition in await processor.verify({tp.partition: b for tp, b in batches.items()}):
                del batches[TP(topic.get_topic_name(), partition)]
            # One call per fetch: one flush of outputs and changelog, then one commit (the
            # processor applies a large fetch in chunks, letting the timers run between them).
            await processor.handle([r for part in batches.values() for r in part])

        app.batch_handlers[topic.get_topic_name()] = on_batch

        @app.agent(topic, name="serving-metrics")
        async def serving_metrics(stream: faust.StreamT) -> None:
            async for _ in stream:
                raise RuntimeError(
                    f"{topic.get_topic_name()} reached the agent: run the app on "
                    "mlbus.streams.transport.App, which hands it over in batches"
                )

        @app.timer(TICK_SECONDS, name="idle-windows")
        async def idle_windows() -> None:
            await processor.tick()

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust passes `signal` in **kwargs, its type wants it named
        async def on_revoked(sender: Any, revoked: Sequence[Any], **_: Any) -> None:
            processor.revoked(tp.partition for tp in revoked if tp.topic == topic.get_topic_name())

        self._agent = serving_metrics  # keep references: faust registers them on the app
        self._timer = idle_windows
        self._on_revoked = on_revoked

    def start_side_services(self, baseline_timeout: float = 60.0) -> None:
        """Topics, baselines (read to the end before the first record), the exporter."""
        replication = ensure_changelog(self.kafka, self.options.app_id)
        self.app.conf.topic_replication_factor = replication
        self.follower.start()
        if not self.follower.wait(baseline_timeout):
            if self.follower.error is not None:  # the view keeps retrying; the service does not
                raise TransientError(f"cannot read the training baselines: {self.follower.error}")
            log.warning("streams: training baselines not read within %.0fs", baseline_timeout)
        if self.options.metrics_port:
            self.exporter.serve(self.options.metrics_port)
        if self.feedback is not None:
            self.feedback.start()

    def _lag(self) -> dict[tuple[str, str, int], int]:
        """The app's consumer lag per partition: faust reads with aiokafka, not librdkafka,
        so this is the fetch responses' high-water mark (right on the embedded broker too,
        docs/broker.md) minus the next offset the app processes, which the transport
        commits after each batch (streams/transport.py). Read from the metrics server's
        thread: a consumer in the middle of a rebalance answers nothing this time, and one
        faust has not made yet is not made here (`app.consumer` would make it, bound to this
        thread's event loop instead of the worker's)."""
        figures: dict[tuple[str, str, int], int] = {}
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return figures
        try:
            read = getattr(consumer, "_read_offset", {})  # faust's per-partition progress
            topic = self.kafka.topic(EVENT_TYPE)
            for tp in [tp for tp in list(consumer.assignment()) if tp.topic == topic]:
                # No position yet: nothing committed, so the app reads from the start of the
                # log (auto_offset_reset earliest), counted from offset 0.
                high, position = consumer.highwater(tp), read.get(tp) or 0
                if isinstance(high, int) and high >= 0:
                    figures[(self.options.app_id, tp.topic, tp.partition)] = max(0, high - position)
        except Exception:  # not started yet, stopping, or reassigning
            return {}
        return figures

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT; the exit code."""
        self.start_side_services()
        worker = faust.Worker(
            self.app,
            loglevel=self.options.loglevel,
            quiet=True,
            redirect_stdouts=False,
            override_logging=False,
        )
        tune_gc()
        code = 0
        try:
            worker.execute_from_commandline()
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            self.follower.stop()
            if self.feedback is not None:
                self.feedback.stop()
            self.processor.producer.close(10)
        return code


class _FaustProcessor(StreamProcessor):
    def __init__(self, *args: Any, app: faust.App, topic: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app = app
        self._topic = topic

    def highwater(self, partition: int) -> int | None:
        # The high-water mark of the last fetch response (right on the embedded broker,
        # unlike list-offsets: docs/broker.md).
        try:
            value = self._app.consumer.highwater(TP(self._topic, partition))
        except Exception:  # not assigned (yet), or the consumer is restarting
            return None
        return value if isinstance(value, int) and value >= 0 else None

    async def _rewind(self, partition: int) -> bool:
        await self._app.consumer.seek(TP(self._topic, partition), 0)
        return True

    async def _flush_changelog(self) -> None:
        # The changelog records must be on the broker before faust commits the batch's
        # input offsets (the transport commits after the batch handler returns).
        await self._app.producer.flush()

"""`mlbus demo` (what `make demo` runs): the main job, end to end, on the embedded defaults.

For now: start the embedded broker, create the topics, publish a `dataset.created` for a
Parquet file it writes, read the event back through the consumer loop, and show that a
record which is not a valid event lands in the dead-letter topic. Stops everything it
started.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import orjson
from confluent_kafka import Producer
from rich.panel import Panel

from mlbus.broker import EmbeddedBroker
from mlbus.cli.common import app, console, settings
from mlbus.cli.platform import topic_table
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.kafka.producer import EventProducer
from schemas.datasets import ColumnSchema, DatasetCreated
from schemas.envelope import Event


def _sample_parquet(folder: Path) -> tuple[Path, int, list[ColumnSchema]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"x": [float(i) for i in range(100)], "label": [i % 2 for i in range(100)]})
    path = folder / "sample.parquet"
    pq.write_table(table, path)
    schema = [
        ColumnSchema(name=f.name, type=str(f.type), nullable=f.nullable) for f in table.schema
    ]
    return path, table.num_rows, schema


@app.command()
def demo() -> None:
    """Run the main job end to end on the embedded defaults, then stop everything."""
    cfg = settings()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="demo-", dir=_ensure(cfg.data_dir))).resolve()
    console.rule("[bold]mlbus demo")
    with EmbeddedBroker(workdir, record=False) as broker:
        console.print(
            f"1. embedded broker up at [bold]{broker.bootstrap}[/] (pid {broker.process.pid})"
        )  # type: ignore[union-attr]
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        console.print("2. topics from the catalog:")
        console.print(topic_table(apply_topics(kafka)))

        path, rows, schema = _sample_parquet(workdir)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        payload = DatasetCreated(
            name="sample", version=digest[:16], uri=path.as_uri(), content_hash=f"sha256:{digest}",
            arrow_schema=schema, num_rows=rows, num_bytes=path.stat().st_size, label_column="label",
            tags={"origin": "demo"},
        )  # fmt: skip
        with EventProducer(kafka, source="mlbus/demo") as producer:
            ref = producer.publish(payload, subject=f"sample@{payload.version}")
        console.print(
            f"3. published [cyan]dataset.created[/] id [bold]{ref.id}[/] (delivery confirmed)"
        )

        # A record an upstream system got wrong: it must reach the dead-letter topic.
        raw = Producer({"bootstrap.servers": broker.bootstrap})
        raw.produce(
            "dataset.created", b'{"specversion": "1.0", "type": "dataset.created"}', b"sample"
        )
        raw.flush(10)
        del raw  # its connection must not outlive the broker
        console.print("4. a plain Kafka client produced an invalid record to dataset.created")

        received: list[Event] = []

        def on_dataset(event: Event, record: Record) -> None:
            received.append(event)

        loop = ConsumerLoop(
            kafka, group="mlbus-demo", handlers={"dataset.created": on_dataset}, name="demo"
        )
        stats = loop.run(stop_at_end=True, install_signal_handlers=False)
        console.print(
            f"5. consumer loop read it back: {stats.handled} event handled, "
            f"{stats.deadlettered} record dead-lettered"
        )
        for event in received:
            body = orjson.dumps(
                event.model_dump(mode="json", exclude_none=True), option=orjson.OPT_INDENT_2
            )
            console.print(Panel(body.decode(), title=f"{event.type} (read back)", expand=False))
        letters: list[Event] = []
        ConsumerLoop(
            kafka, group="mlbus-demo-dlq", name="demo",
            handlers={"mlbus.deadletter": lambda e, r: letters.append(e)},
        ).run(stop_at_end=True, install_signal_handlers=False)  # fmt: skip
        for letter in letters:
            console.print(f"6. dead letter: [yellow]{letter.data.reason}[/]")  # type: ignore[attr-defined]
        ok = len(received) == 1 and received[0].id == ref.id and len(letters) == 1
    console.print(f"7. broker stopped; demo took {time.monotonic() - started:.1f}s")
    if not ok:
        console.print(f"[red]demo failed: the event did not come back as published[/] ({workdir})")
        raise SystemExit(1)
    shutil.rmtree(workdir, ignore_errors=True)
    console.rule("[green]demo passed")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

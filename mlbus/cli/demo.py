"""`mlbus demo` (what `make demo` runs): the main job, end to end, on the embedded defaults.

So far: start the embedded broker and create the topics; register the scikit-learn digits
sample as a dataset version (content-addressed Parquet on the local object store, published
as `dataset.created`); register it again (no new version); let the validator check it
against its bytes and publish `dataset.validated`; have an "upstream system" announce a
dataset whose bytes do not match, and watch it land in the dead-letter topic instead; read
the version back with its hash verified. Stops everything it started.
"""

from __future__ import annotations

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
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader
from schemas.envelope import Event


def _step(n: int, text: str) -> None:
    console.print(f"[bold cyan]{n}.[/] {text}")


@app.command()
def demo() -> None:
    """Run the main job end to end on the embedded defaults, then stop everything."""
    from datasets.registry import DatasetRegistry
    from datasets.samples import SAMPLES, sample_table
    from datasets.sources import from_table
    from datasets.validator import Validator

    cfg = settings()
    started = time.monotonic()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="demo-", dir=cfg.data_dir)).resolve()
    console.rule("[bold]mlbus demo")
    with EmbeddedBroker(workdir, record=False) as broker:
        pid = broker.process.pid if broker.process else "?"
        _step(1, f"embedded broker up at [bold]{broker.bootstrap}[/] (pid {pid})")
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        statuses = apply_topics(kafka)
        _step(2, f"{len(statuses)} topics created from the catalog")
        console.print(topic_table(statuses))

        store = ObjectStore((workdir / "objects").as_uri())
        store.allowed_roots = [str(workdir)]
        registry = DatasetRegistry(store, kafka)
        table = sample_table("digits")
        first = registry.register(
            from_table(table, "sklearn:digits"), name="digits", label="label",
            tags={"source": "scikit-learn"}, description=SAMPLES["digits"],
        )  # fmt: skip
        _step(3, f"registered [bold]digits@{first.version[:12]}[/] ({first.num_rows:,} rows, "
                 f"{first.num_bytes:,} bytes) → dataset.created {first.event_id}")  # fmt: skip
        again = registry.register(from_table(table), name="digits", label="label")
        _step(4, f"registered the same data again: new version? [bold]{again.created}[/] "
                 "(content-addressed; nothing published)")  # fmt: skip

        # An upstream system announces a dataset whose bytes are not what it claims.
        forged = first.payload.model_copy(update={"name": "digits-upstream", "num_rows": 10})  # type: ignore[union-attr]
        body = {"specversion": "1.0", "id": "upstream-1", "source": "etl/nightly",
                "type": "dataset.created", "data": forged.model_dump(mode="json")}  # fmt: skip
        raw = Producer({"bootstrap.servers": broker.bootstrap})
        raw.produce("dataset.created", orjson.dumps(body), b"digits-upstream")
        raw.flush(10)
        del raw  # its connection must not outlive the broker
        _step(5, "an upstream system (plain Kafka client) announced 'digits-upstream' with a "
                 "wrong row count")  # fmt: skip

        validated: list[Event] = []
        with EventProducer(kafka, source="mlbus/datasets") as producer:
            loop = ConsumerLoop(
                kafka, group="mlbus-datasets-validator", name="datasets-validator",
                handlers={"dataset.created": Validator(store, producer)},
            )  # fmt: skip
            stats = loop.run(stop_at_end=True, install_signal_handlers=False)
        _step(6, f"validator: {stats.handled} announcement validated, "
                 f"{stats.deadlettered} dead-lettered")  # fmt: skip
        ConsumerLoop(
            kafka, group="mlbus-demo", name="demo",
            handlers={"dataset.validated": lambda e, r: validated.append(e)},
        ).run(stop_at_end=True, install_signal_handlers=False)  # fmt: skip
        letters: list[Event] = []
        ConsumerLoop(
            kafka, group="mlbus-demo-dlq", name="demo",
            handlers={"mlbus.deadletter": lambda e, r: letters.append(e)},
        ).run(stop_at_end=True, install_signal_handlers=False)  # fmt: skip
        for event in validated:
            body = orjson.dumps(
                event.model_dump(mode="json", exclude_none=True), option=orjson.OPT_INDENT_2
            )
            console.print(Panel(body.decode(), title="dataset.validated", expand=False))
        for letter in letters:
            console.print(
                f"   dead letter from {letter.data.original.topic}: [yellow]{letter.data.reason}[/]"
            )  # type: ignore[attr-defined]

        with DatasetReader(store, first.uri, first.content_hash, columns=["label"]) as reader:
            labels = reader.read_all().column("label").to_pylist()
        _step(7, f"read digits@{first.version[:12]} back, sha256 verified: {len(labels):,} rows, "
                 f"{len(set(labels))} classes")  # fmt: skip
        ok = (
            first.created and not again.created and len(validated) == 1
            and validated[0].causationid == first.event_id and len(letters) == 1
            and len(labels) == first.num_rows
        )  # fmt: skip
    _step(8, f"broker stopped; demo took {time.monotonic() - started:.1f}s")
    if not ok:
        console.print(f"[red]demo failed[/] (work dir kept: {workdir})")
        raise SystemExit(1)
    shutil.rmtree(workdir, ignore_errors=True)
    console.rule("[green]demo passed")

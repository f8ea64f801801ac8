"""`mlbus up`, `mlbus topics …` and `mlbus settings`: running the platform."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import orjson
import typer
from rich.table import Table

from mlbus.broker import EmbeddedBroker
from mlbus.cli.common import app, console, kafka_config, settings, topics_app
from mlbus.kafka.admin import TopicStatus, apply_topics, list_topics
from mlbus.kafka.config import KafkaConfig

_STYLE = {"created": "green", "ok": "green", "differs": "yellow", "missing": "red"}


def topic_table(statuses: list[TopicStatus]) -> Table:
    table = Table("topic", "status", "partitions", "replication", "detail")
    capped = sorted({s.replication for s in statuses if s.replication and s.replication < 3})
    if capped:
        table.caption = (
            f"replication {capped[0]}: the cluster has fewer brokers than the catalog's 3"
        )
    for s in statuses:
        style = _STYLE.get(s.status, "")
        table.add_row(
            s.topic,
            f"[{style}]{s.status}[/]",
            str(s.partitions or "-"),
            str(s.replication or "-"),
            s.detail,
        )
    return table


@topics_app.command("apply")
def topics_apply() -> None:
    """Create the catalog's topics that are missing; report those that differ."""
    statuses = apply_topics(kafka_config())
    console.print(topic_table(statuses))


@topics_app.command("list")
def topics_list(
    json_lines: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """The catalog's topics as the cluster has them, and any other topics."""
    statuses, others = list_topics(kafka_config())
    if json_lines:
        for s in statuses:
            print(orjson.dumps(s.__dict__).decode())
        return
    console.print(topic_table(statuses))
    if others:
        console.print("other topics: " + ", ".join(others))


@app.command("settings")
def show_settings() -> None:
    """The effective settings (secrets masked)."""
    console.print_json(orjson.dumps(settings().redacted()).decode())


@app.command()
def up() -> None:
    """Run the platform: the embedded broker (unless MLBUS_KAFKA_BOOTSTRAP_SERVERS names a
    cluster) with the catalog's topics, until Ctrl-C or SIGTERM."""
    cfg = settings()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(cfg.data_dir) if cfg.embedded else None
    started = False
    try:
        if broker is not None:
            broker.start(announce=False)
            started = True
        kafka = KafkaConfig.from_settings(cfg, bootstrap=broker.bootstrap if broker else None)
        statuses = apply_topics(kafka)
        if broker is not None:
            broker.announce()  # only now may other commands find it: the topics exist
        console.print(topic_table(statuses))
        services = Table("service", "pid", "address")
        if broker is not None and broker.process is not None:
            services.add_row(
                "broker (embedded, memory storage)", str(broker.process.pid), broker.bootstrap
            )
        else:
            services.add_row("kafka (external)", "-", kafka.bootstrap)
        console.print(services)
        console.print(f"[green]mlbus is up[/] (data dir {cfg.data_dir}); Ctrl-C stops it.")
        while not stop.wait(0.5):
            if broker is not None and not broker.alive():
                raise typer.Exit(_broker_died(broker))
    finally:
        if broker is not None and started:
            broker.stop()
            console.print("embedded broker stopped")


def _broker_died(broker: EmbeddedBroker) -> int:
    console.print(f"[red]the embedded broker exited[/]; see {broker.log_path}")
    return 1

"""`mlbus up`, `mlbus topics …` and `mlbus settings`: running the platform."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from mlbus.broker import EmbeddedBroker
from mlbus.cli.common import app, console, kafka_config, settings, topics_app
from mlbus.errors import MlbusError
from mlbus.extras import require
from mlbus.journal.format import check_versions
from mlbus.journal.keeper import Keeper
from mlbus.journal.restore import Restored
from mlbus.kafka.admin import (
    TopicStatus,
    apply_topics,
    create_topics_script,
    list_topics,
    strimzi_topics,
    topic_definitions,
)
from mlbus.kafka.config import KafkaConfig
from mlbus.lock import DataDirLock
from mlbus.settings import Settings
from mlbus.supervisor import Supervisor, catalog, select

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


@topics_app.command("export")
def topics_export(
    fmt: Annotated[str, typer.Option("--format", help="yaml, sh or strimzi")] = "yaml",
    replication: Annotated[int, typer.Option(min=1, help="replication factor")] = 3,
) -> None:
    """The catalog's topics for a real cluster (RF 3, min.insync.replicas 2): definitions
    (yaml), a kafka-topics.sh script (sh) or Strimzi KafkaTopic resources (strimzi);
    `infra/` holds all three (`make infra`)."""
    import yaml

    definitions = topic_definitions(replication, prefix=settings().topic_prefix)
    if fmt == "yaml":
        header = "# Generated from schemas/catalog.py by `mlbus topics export`; do not edit.\n"
        print(header + yaml.safe_dump({"topics": definitions}, sort_keys=False), end="")
    elif fmt == "sh":
        print(create_topics_script(definitions), end="")
    elif fmt == "strimzi":
        print(strimzi_topics(definitions), end="")
    else:
        raise MlbusError(f"--format {fmt!r}: use yaml or sh")


@app.command("settings")
def show_settings() -> None:
    """The effective settings (secrets masked)."""
    console.print_json(orjson.dumps(settings().redacted()).decode())


_COLORS = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_yellow",
    "bright_blue",
)


def service_output(names: list[str]) -> Callable[[str, str], None]:
    """One log stream: every line prefixed with its service's name, in the service's colour."""
    width = max(len(n) for n in [*names, "mlbus"])
    colours = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(names)}
    colours["mlbus"] = "bold white"
    lock = threading.Lock()

    def show(name: str, line: str) -> None:
        with lock:
            console.print(
                f"[{colours.get(name, 'white')}]{name:<{width}}[/] | {escape(line)}",
                highlight=False,
                soft_wrap=True,
            )

    return show


def service_env(cfg: Settings) -> dict[str, str]:
    """The services' environment: the caller's, with the data dir made absolute (they find
    the embedded broker through it), the global options' settings, and output that suits a
    merged log."""
    env = dict(os.environ)
    env["MLBUS_DATA_DIR"] = str(cfg.data_dir.resolve())
    env["MLBUS_VERIFY"] = cfg.verify  # `mlbus --verify full up` reaches every service
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("COLUMNS", "160")  # rich wraps piped output at 80 columns otherwise
    # Each service's fetch wait on the embedded broker is its manifest's (`mlbus run`).
    return env


@app.command()
def up(
    trainers: Annotated[int, typer.Option(min=0, help="training workers to run")] = 1,
    only: Annotated[
        str | None,
        typer.Option(help="comma-separated services to run (e.g. serve,trainer); default all"),
    ] = None,
) -> None:
    """Run the platform: the embedded broker (unless MLBUS_KAFKA_BOOTSTRAP_SERVERS names a
    cluster) with the catalog's topics, and every service supervised, until Ctrl-C or
    SIGTERM."""
    cfg = settings()
    require("platform", *(["embedded"] if cfg.embedded else []))  # before any service starts
    services = select(catalog(cfg, trainers=trainers), only)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(cfg.data_dir)
    lock.acquire()  # one platform per data dir; released however this process ends
    journal_dir = cfg.data_dir / "journal"
    kept = cfg.embedded and cfg.journal.enabled
    if kept:
        check_versions(journal_dir)  # a journal we cannot read refuses the start, untouched
    show = service_output([s.name for s in services])
    # Embedded with a journal: the broker behind its gate, restarted from the journal when
    # it dies or outgrows retention (mlbus/journal/keeper.py). Without a journal, a broker
    # that dies stops the platform: nothing could be restored into a new one.
    keeper = Keeper(cfg, report=lambda line: show("mlbus", line)) if kept else None
    broker = EmbeddedBroker(cfg.data_dir) if cfg.embedded and not kept else None
    started = False
    supervisor: Supervisor | None = None
    died = threading.Event()
    try:
        if keeper is not None:
            started = True
            statuses, restored = keeper.start()
            _report_restore(restored, journal_dir)
            kafka = KafkaConfig.from_settings(cfg, bootstrap=keeper.bootstrap)
        else:
            if broker is not None:
                broker.start()
                started = True
            kafka = KafkaConfig.from_settings(cfg, bootstrap=broker.bootstrap if broker else None)
            statuses = apply_topics(kafka)
        console.print(topic_table(statuses))
        env = service_env(cfg)
        if keeper is not None:  # a restored log, at start or after the broker's replacement
            env = _rebuild_on_lost_tail(cfg, env)
        supervisor = Supervisor(services, env=env, output=show, data_dir=cfg.data_dir)
        supervisor.start()
        table = Table("service", "pid", "address", title="mlbus services")
        if keeper is not None and keeper.broker is not None and keeper.broker.process:
            table.add_row(
                "broker (embedded)",
                str(keeper.broker.process.pid),
                f"{keeper.bootstrap} (gate) → {keeper.broker.bootstrap}",
            )
        elif broker is not None and broker.process is not None:
            table.add_row("broker (embedded)", str(broker.process.pid), broker.bootstrap)
        else:
            table.add_row("kafka (external)", "-", kafka.bootstrap)
        for row in supervisor.status():
            table.add_row(str(row["service"]), str(row["pid"]), str(row["url"] or "-"))
        console.print(table)
        console.print(f"[green]mlbus is up[/] (data dir {cfg.data_dir}); Ctrl-C stops it.")
        if broker is not None:
            watcher = threading.Thread(target=_watch_broker, args=(broker, stop, died), daemon=True)
            watcher.start()
        supervisor.watch(stop, each_tick=keeper.check if keeper is not None else None)
    finally:
        if supervisor is not None:
            show("mlbus", "stopping services…")
            codes = supervisor.stop()
            unclean = [f"{name} ({code})" for name, code in codes if code not in (0, -15)]
            show(
                "mlbus",
                "all services stopped"
                + (f"; unclean exits: {', '.join(unclean)}" if unclean else " cleanly"),
            )
        if keeper is not None and started:
            keeper.stop()  # after the services: their last records and offsets are kept
            replaced = len(keeper.cycles)
            console.print(
                f"journal: {keeper.records} records captured this run"
                + (f"; the broker was replaced {replaced} time(s)" if replaced else "")
            )
            console.print("embedded broker stopped")
        if broker is not None and started:
            broker.stop()
            console.print("embedded broker stopped")
        lock.release()
    if broker is not None and died.is_set():
        raise typer.Exit(_broker_died(broker))


def _rebuild_on_lost_tail(cfg: Settings, env: dict[str, str]) -> dict[str, str]:
    """On a restored log (at start, or in a broker that replaced a dead one) the one way a
    store's positions (lineage, archive, the stream processors' tables) can name a record
    that is not there is the journal's lost tail: a record the store took in the last
    moments before a crash. The store is then rebuilt from the log, its source of truth,
    unless the user chose otherwise."""
    if "on_new_log" in cfg.positions.model_fields_set:
        return env
    return env | {"MLBUS_POSITIONS__ON_NEW_LOG": "rebuild"}


def _watch_broker(broker: EmbeddedBroker, stop: threading.Event, died: threading.Event) -> None:
    while not stop.wait(0.5):
        if not broker.alive():
            died.set()
            stop.set()


def _report_restore(restored: Restored, journal_dir: Path) -> None:
    for torn in restored.scan.torn:
        console.print(
            f"[yellow]journal: a torn final write[/] in {torn.segment.name} at byte "
            f"{torn.position} ({torn.size} bytes, {torn.reason}): skipped; everything before "
            "it is restored and the file is left as it is (`mlbus journal verify`)"
        )
    for clamp in restored.clamped:
        console.print(f"[yellow]journal: group offset past the journal's end, set back:[/] {clamp}")
    if not restored.scan.segments:
        console.print(f"journal: none yet in {journal_dir}; a new one starts")
        return
    console.print(
        f"journal: restored {restored.records:,} records of {restored.topics} topics"
        + (f" ({restored.gaps} transaction markers)" if restored.gaps else "")
        + f" and the offsets of {restored.groups} consumer groups in {restored.seconds:.2f}s"
        + (f" ({restored.rate:,.0f} records/s)" if restored.records else "")
    )


def _broker_died(broker: EmbeddedBroker) -> int:
    console.print(f"[red]the embedded broker exited[/]; see {broker.log_path}")
    return 1

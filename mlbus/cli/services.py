"""`mlbus run <service>` (one service alone in the foreground: what a container runs),
`mlbus services list|export` (the manifests of mlbus/services.py, and infra/'s compose and
Kubernetes definitions rendered from them) and `mlbus services alive` (the probe of a service
with no HTTP endpoint: `mlbus run` keeps a heartbeat file fresh while its process is up and
its interpreter responsive)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from mlbus.cli.common import app, console, settings
from mlbus.errors import MlbusError
from mlbus.kafka.config import EMBEDDED_FETCH_WAIT_MS
from mlbus.services import SERVICES, Service, names, service
from mlbus.settings import Settings

services_app = typer.Typer(
    help="The platform's services, as their manifests declare them.", no_args_is_help=True
)
app.add_typer(services_app, name="services")


@app.command("run")
def run(
    name: Annotated[str, typer.Argument(metavar="SERVICE", help=", ".join(names()))],
) -> None:
    """Run one service alone in the foreground, until SIGTERM/SIGINT: what a container runs
    (`mlbus up` runs each service this way under its supervisor)."""
    manifest = service(name)
    cfg = settings()
    polling(manifest)
    _start_heartbeat(heartbeat_path(cfg.data_dir, name))
    serve_metrics(manifest, cfg)
    code = manifest.entry()(manifest, cfg)
    raise typer.Exit(code or 0)


def polling(manifest: Service) -> None:
    """This process's consumers poll the embedded broker at the service's pace
    (`Service.fetch_wait_ms`): each service as reactive as it needs, and no more costly."""
    if manifest.fetch_wait_ms is not None:
        EMBEDDED_FETCH_WAIT_MS[0] = manifest.fetch_wait_ms


def serve_metrics(manifest: Service, cfg: Settings) -> None:
    """/metrics of a service with no HTTP server of its own, on its manifest's port (0: off):
    the process, platform and GC collectors and its consumer groups' lag."""
    if not manifest.metrics.own_server:
        return
    port = manifest.metrics.port_of(cfg)
    if port:
        from mlbus.metrics import serve

        serve(port, cfg.metrics.host)


#: How often `mlbus run` touches its heartbeat file, and how old `mlbus services alive`
#: accepts it (a few missed beats: a busy interpreter is not a dead one).
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_STALE_SECONDS = 60.0


def heartbeat_path(data_dir: Path, name: str) -> Path:
    return data_dir / "run" / f"{name}.alive"


def _start_heartbeat(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def beat() -> None:
        while True:
            path.touch()
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="mlbus-heartbeat", daemon=True).start()


@services_app.command("alive")
def services_alive(
    name: Annotated[str, typer.Argument(metavar="SERVICE", help=", ".join(names()))],
    within: Annotated[
        float, typer.Option("--within", help="seconds the last heartbeat may be old")
    ] = HEARTBEAT_STALE_SECONDS,
) -> None:
    """Exit 0 if `mlbus run SERVICE` on this host beat within --within seconds (a container
    probe for the services with no HTTP endpoint), 1 otherwise."""
    path = heartbeat_path(settings().data_dir, service(name).name)
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        console.print(f"{name}: no heartbeat at {path}", highlight=False)
        raise typer.Exit(1) from None
    if age > within:
        console.print(f"{name}: last heartbeat {age:.0f}s ago", highlight=False)
        raise typer.Exit(1)


@services_app.command("list")
def services_list(
    json_lines: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """Every service: its consumer group, source, topics read and written, health check and
    /metrics."""
    cfg = settings()
    rows = [
        {
            "service": s.name,
            "group": s.group_id(cfg.topic_prefix) if s.group else None,
            "source": s.source,
            "reads": list(s.reads),
            "writes": list(s.writes),
            "health": s.health and f"{s.health.path} on {s.health.port}",
            "metrics": f"{s.metrics.path} on {s.metrics.port}",
            "build": s.build,
        }
        for s in SERVICES
    ]
    if json_lines:
        for row in rows:
            print(orjson.dumps(row).decode())
        return
    table = Table("service", "group", "source", "reads", "writes", "health", "metrics")
    for s in SERVICES:
        table.add_row(
            s.name,
            s.group_id(cfg.topic_prefix) if s.group else "-",
            s.source,
            ", ".join(s.reads) or "-",
            ", ".join(s.writes) or "-",
            f"{s.health.path} on {s.health.port}" if s.health else "heartbeat (services alive)",
            f"{s.metrics.path} on {s.metrics.port}",
        )
    console.print(table)


@services_app.command("export")
def services_export(
    fmt: Annotated[str, typer.Option("--format", help="compose, k8s or prometheus")] = "compose",
    into: Annotated[
        Path | None,
        typer.Option(
            "--into",
            help="compose: rewrite this file's generated services instead of printing them",
        ),
    ] = None,
) -> None:
    """The services for a container platform, each `mlbus run <service>`: compose entries
    (between the markers of infra/docker-compose.yml), Kubernetes Deployments
    (infra/k8s/services.yaml) or the Prometheus configuration scraping every service's
    /metrics (infra/prometheus/prometheus.yml); `make infra` writes them."""
    from mlbus.deploy import (
        compose_services,
        compose_with_services,
        kubernetes_services,
        prometheus_config,
    )

    if fmt == "compose":
        if into is None:
            print(compose_services(), end="")
        else:
            into.write_text(compose_with_services(into.read_text()))
    elif fmt in ("k8s", "prometheus"):
        if into is not None:
            raise MlbusError(f"--into is for --format compose; redirect {fmt} to a file")
        print(kubernetes_services() if fmt == "k8s" else prometheus_config(), end="")
    else:
        raise MlbusError(f"--format {fmt!r}: use compose, k8s or prometheus")

"""`mlbus streams`: the stream processors (serving metrics, drift, alerts, online accuracy from
feedback) in the foreground; exits 0 on SIGTERM/SIGINT."""

from __future__ import annotations

from typing import Annotated

import typer

from mlbus.cli.common import app, err_console, kafka_config, settings
from mlbus.services import Service, service
from mlbus.settings import Settings


@app.command("streams")
def streams(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Prometheus /metrics port; 0 = off "
            "[env: MLBUS_STREAMS__METRICS_PORT; default 9108]",
        ),
    ] = None,
    app_id: Annotated[
        str | None,
        typer.Option(
            "--app-id",
            help="faust app id = consumer group and changelog names; a "
            "new id replays inference.logged from offset 0 [default: "
            "<topic prefix>mlbus-streams]",
        ),
    ] = None,
    idle_seconds: Annotated[
        float | None,
        typer.Option(
            "--idle-seconds",
            help="close the last windows of a partition idle this long [default: window + grace]",
        ),
    ] = None,
) -> None:
    """Run the stream processors: windowed serving metrics, drift and alerts from
    inference.logged into serving.metrics, serving.alert and Prometheus, and online accuracy
    from inference.feedback into serving.accuracy. Without options, the same as
    `mlbus run streams`."""
    raise typer.Exit(_streams(service("streams"), settings(), metrics_port, app_id, idle_seconds))


def run_streams(manifest: Service, cfg: Settings) -> int:
    """The stream processors in the foreground (`mlbus run streams`); their exit code."""
    return _streams(manifest, cfg, None, None, None)


def _streams(
    manifest: Service,
    cfg: Settings,
    metrics_port: int | None,
    app_id: str | None,
    idle_seconds: float | None,
) -> int:
    from mlbus.streams.app import StreamsApp, StreamsOptions

    kafka = kafka_config(cfg)
    # faust's app id is its consumer group (and names its changelogs).
    app_name = app_id or manifest.group_id(cfg.topic_prefix)
    port = cfg.streams.metrics_port if metrics_port is None else metrics_port
    options = StreamsOptions(
        app_id=app_name,
        data_dir=cfg.data_dir / "streams" / app_name,
        metrics_port=port,
        web_port=cfg.streams.web_port,
        idle_seconds=idle_seconds,
        loglevel="info" if cfg.log_level == "DEBUG" else "warning",
    )
    err_console.print(
        f"streams {app_name}: reading {kafka.topic('inference.logged')}"
        + (f", metrics on :{port}/metrics" if port else ""),
        highlight=False,
    )
    return StreamsApp(kafka, cfg.streams, options, cfg.positions.on_new_log).run()

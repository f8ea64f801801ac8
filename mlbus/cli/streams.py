"""`mlbus streams`: the stream processors (serving metrics, drift, alerts) in the foreground;
exits 0 on SIGTERM/SIGINT."""

from __future__ import annotations

from typing import Annotated

import typer

from mlbus.cli.common import app, err_console, kafka_config, settings


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
    inference.logged into serving.metrics, serving.alert and Prometheus."""
    from mlbus.streams.app import StreamsApp, StreamsOptions

    cfg = settings()
    kafka = kafka_config(cfg)
    app_name = app_id or f"{cfg.topic_prefix}mlbus-streams"
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
    code = StreamsApp(kafka, cfg.streams, options).run()
    raise typer.Exit(code)

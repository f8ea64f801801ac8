"""`mlbus serve`: the model server (serving/), an Open Inference Protocol v2 endpoint that
follows `model.promoted`. SIGTERM/SIGINT shut it down gracefully (uvicorn finishes the
requests in flight; the log reader, stream consumer and producers are closed) and exit 0."""

from __future__ import annotations

from typing import Annotated

import typer

from mlbus.cli.common import app, kafka_config, settings
from mlbus.cli.web import server as server_of
from mlbus.services import Service, service
from mlbus.settings import Settings


@app.command("serve")
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="interface to listen on (default: env MLBUS_SERVING__HOST, 127.0.0.1)"),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="port (default: env MLBUS_SERVING__PORT, 8080)")
    ] = None,
) -> None:
    """Serve the promoted models over HTTP (OIP v2 at /v2, /metrics, /docs) and Kafka.
    Without options, the same as `mlbus run serve`."""
    _serve(service("serve"), settings(), host, port)


def run_serving(manifest: Service, cfg: Settings) -> None:
    """The model server in the foreground (`mlbus run serve`)."""
    _serve(manifest, cfg, None, None)


def _serve(manifest: Service, cfg: Settings, host: str | None, port: int | None) -> None:
    import uvicorn

    from mlbus.serving.app import create_app
    from mlbus.serving.server import ModelServer
    from mlbus.storage import ObjectStore

    config = cfg.serving.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    token = cfg.api_token.get_secret_value() if cfg.api_token is not None else None
    server = ModelServer(
        kafka_config(cfg),
        ObjectStore.from_settings(cfg),
        config,
        api_token=token,
        stream_group=manifest.group_id(cfg.topic_prefix),
    )
    uv = uvicorn.Config(
        create_app(server),
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    # SIGTERM/SIGINT is a clean stop (exit 0): uvicorn re-raises the signal once it has
    # shut down, which would make the process die by it.
    server_of(uv, clean_exit=True).run()

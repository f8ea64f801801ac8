"""`mlbus api`: runs the control-plane HTTP API (mlbus/cli/control_plane.py), imported when
the command runs: FastAPI and the routers' components would slow every other command's
start."""

from __future__ import annotations

from typing import Annotated

import typer

from mlbus.cli.common import app, settings
from mlbus.services import Service
from mlbus.settings import Settings


@app.command("api")
def serve_api(
    host: Annotated[str | None, typer.Option(help="interface [env: MLBUS_API__HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [env: MLBUS_API__PORT]")] = None,
) -> None:
    """Run the control-plane HTTP API (OpenAPI document at /docs and /openapi.json). Without
    options, the same as `mlbus run api`."""
    _api(settings(), host, port)


def run_api(manifest: Service, cfg: Settings) -> None:
    """The control-plane API in the foreground (`mlbus run api`)."""
    _api(cfg, None, None)


def _api(cfg: Settings, host: str | None, port: int | None) -> None:
    import uvicorn

    from mlbus.cli.control_plane import create_app
    from mlbus.cli.web import server

    config = uvicorn.Config(
        create_app(cfg), host=host or cfg.api.host, port=port or cfg.api.port, log_level="info"
    )
    server(config).run()

"""The `mlbus` command. An entry point: the only place (with app composition) that reads the
environment and knows every component."""

from __future__ import annotations

import sys

from mlbus.cli.common import app, err_console
from mlbus.errors import ConfigError, MlbusError


def main() -> None:
    try:
        app()
    except ConfigError as e:
        err_console.print(f"[bold red]mlbus:[/] {e}", highlight=False)
        sys.exit(2)
    except MlbusError as e:
        err_console.print(f"[bold red]mlbus:[/] {e}", highlight=False)
        sys.exit(1)


# Commands register themselves on `app` when their modules are imported.
from mlbus.cli import (  # noqa: E402, F401
    api,
    archive,
    datasets,
    demo,
    events,
    lineage,
    platform,
    services,
    serving,
    streams,
    training,
    workflow,
)

__all__ = ["app", "main"]

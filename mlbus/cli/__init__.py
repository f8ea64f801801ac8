"""The `mlbus` command. An entry point: the only place (with app composition) that reads the
environment and knows every component."""

from __future__ import annotations

import sys

from rich.markup import escape

from mlbus.cli.common import app, err_console
from mlbus.errors import ConfigError, MlbusError
from mlbus.extras import missing_extra


def main() -> None:
    try:
        app()
    except ConfigError as e:
        err_console.print(f"[bold red]mlbus:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except MlbusError as e:
        err_console.print(f"[bold red]mlbus:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)
    except ModuleNotFoundError as e:
        # A command of an extra that is not installed (pip install mlbus alone): one line
        # naming the extra, not a traceback.
        missing = missing_extra(e)
        if missing is None:
            raise
        err_console.print(f"[bold red]mlbus:[/] {escape(str(missing))}", highlight=False)
        sys.exit(2)


# Commands register themselves on `app` when their modules are imported.
from mlbus.cli import (  # noqa: E402, F401
    api,
    archive,
    datasets,
    demo,
    events,
    journal,
    lineage,
    platform,
    runs,
    services,
    serving,
    streams,
    training,
    tuning,
    workflow,
)

__all__ = ["app", "main"]

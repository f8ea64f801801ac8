"""`mlbus demo` (what `make demo` runs): the main job, end to end, on the embedded defaults
(mlbus/cli/demo_job.py, imported when the command runs: its HTTP client and Arrow would
slow every other command's start)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlbus.cli.common import app
from mlbus.extras import require

PIPELINE = Path(__file__).resolve().parents[2] / "infra" / "pipelines" / "digits.yaml"


@app.command()
def demo(
    pipeline: Annotated[
        Path, typer.Option(help="the pipeline to apply", exists=True, dir_okay=False)
    ] = PIPELINE,
) -> None:
    """Run the main job end to end on the embedded defaults, then stop everything."""
    require("platform", "embedded")
    from mlbus.cli.demo_job import run_demo

    run_demo(pipeline)

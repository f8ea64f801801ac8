"""`mlbus run tuning` (the tuning service, consumers/tuning/) and `mlbus tune` (publish a
hyperparameter search, checked first, and follow its trials live until it finishes)."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import typer
from rich.live import Live
from rich.table import Table

from mlbus.cli.common import app, console, kafka_config, key_values, scalar, settings
from mlbus.kafka.producer import DurableProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.search import Objective, SearchRequested
from mlbus.search import check_search, new_search_id, parse_space
from mlbus.services import Service
from mlbus.settings import Settings
from mlbus.storage import ObjectStore


def run_tuning(manifest: Service, cfg: Settings) -> None:
    """The tuning service in the foreground; exits 0 on SIGTERM/SIGINT."""
    from mlbus.consumers.tuning.service import TuningService

    TuningService(kafka_config(cfg), source=manifest.source).run()


@app.command("tune")
def tune(
    model: Annotated[str, typer.Argument(help="model name")],
    dataset: Annotated[str, typer.Option(help="NAME@VERSION (a unique version prefix will do)")],
    space: Annotated[Path, typer.Option(help="search space YAML: name: {type, low, high, log}")],
    family: Annotated[str, typer.Option(help="model family: mlp, cnn, ...")] = "mlp",
    trials: Annotated[int, typer.Option(help="budget: trials at most")] = 20,
    parallel: Annotated[int, typer.Option(help="trials running at once")] = 1,
    pruner: Annotated[str, typer.Option(help="median, halving or none")] = "median",
    sampler: Annotated[str, typer.Option(help="tpe, random or grid")] = "tpe",
    objective: Annotated[str, typer.Option(help="split.metric to optimise")] = (
        "validation.accuracy"
    ),
    direction: Annotated[str, typer.Option(help="max or min")] = "max",
    timeout: Annotated[
        float | None, typer.Option(help="budget: seconds after which no trial is requested")
    ] = None,
    param: Annotated[list[str], typer.Option(help="KEY=VALUE fixed hyperparameter")] = [],  # noqa: B006
    epochs: Annotated[int, typer.Option(help="max epochs of a trial")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    pipeline: Annotated[
        str | None, typer.Option(help="pipeline whose promotion policy judges the best trial")
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the trials until the search ends")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="the search's summary as JSON")] = False,
) -> None:
    """Start a hyperparameter search (Optuna, run by the tuning service)."""
    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.refs import parse
    from mlbus.search import InvalidSearch

    choices = {"pruner": ("median", "halving", "none"), "sampler": ("tpe", "random", "grid")}
    for option, value in (("pruner", pruner), ("sampler", sampler)):
        if value not in choices[option]:
            raise InvalidSearch(f"--{option} {value!r}: one of {', '.join(choices[option])}")
    if direction not in ("max", "min"):
        raise InvalidSearch(f"--direction {direction!r}: max or min")
    if trials < 1:
        raise InvalidSearch("--trials 0: a budget of zero trials; ask for at least one")
    if parallel < 1:
        raise InvalidSearch("--parallel must be at least 1")
    if timeout is not None and timeout <= 0:
        raise InvalidSearch("--timeout must be positive")
    try:
        text = space.read_text()
    except OSError as e:
        raise InvalidSearch(f"--space {space}: {e.strerror or e}") from None
    request = SearchRequested(
        search_id=new_search_id(),
        model=model,
        dataset=DatasetRef(name="pending", version="pending"),
        family=family,
        space=parse_space(text, where=str(space)),
        hyperparameters={k: scalar(v) for k, v in key_values(param, "--param").items()},
        sampler=sampler,  # type: ignore[arg-type]  # checked above
        pruner=pruner,  # type: ignore[arg-type]  # checked above
        objective=Objective(metric=objective, direction=_direction(direction)),
        trials=trials,
        parallel=parallel,
        timeout_seconds=timeout,
        seed=seed,
        max_epochs=epochs,
        pipeline=pipeline,
        requested_by="cli",
    )
    origin = check_search(request)  # before anything is looked up or published
    ref = parse(dataset, what="--dataset NAME", need_version=True)
    kafka = kafka_config()
    found = DatasetRegistry(ObjectStore.from_settings(settings()), kafka).get(str(ref)).data
    request = request.model_copy(
        update={
            "dataset": DatasetRef(name=found.name, version=found.version),
            "family_origin": origin,
        }
    )
    with DurableProducer(kafka, source="mlbus/cli") as producer:
        # The search's id is its event's: every trial's correlation id.
        producer.publish(request, event_id=request.search_id, subject=request.search_id)
    if not (wait or json_out):
        console.print(f"search {request.search_id} requested ({trials} trials, {sampler})")
        return
    summary = follow(request.search_id, live=not json_out)
    if json_out:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    raise typer.Exit(0 if summary and summary["best"] is not None else 1)


def _direction(text: str) -> Literal["max", "min"]:
    return "min" if text == "min" else "max"


def follow(search_id: str, *, live: bool = True, poll: float = 0.5) -> dict[str, Any] | None:
    """Read the search's events until it is finished; a live table meanwhile."""
    from mlbus.consumers.tuning.state import READS, Book
    from mlbus.kafka.logview import LogView

    book = Book()
    view = LogView(kafka_config(), READS, name="mlbus tune")
    screen = Live(console=console, refresh_per_second=4) if live else None
    summary: dict[str, Any] | None = None
    try:
        if screen is not None:
            screen.start()
        while True:
            book.fold(item.event for item in view.poll(poll))
            summary = book.summary(search_id, datetime.now(UTC))
            if summary is not None and screen is not None:
                screen.update(_table(summary))
            if summary is not None and summary["finished"]:
                return summary
            time.sleep(0.05)
    finally:
        if screen is not None:
            screen.stop()
        view.stop()


def _table(s: dict[str, Any]) -> Table:
    c, best = s["counts"], s["best"]
    title = (
        f"search {s['search_id'][:8]} · {s['sampler']} + {s['pruner']} · "
        f"{c['running']} running, {c['pruned']} pruned, {c['completed']} finished, "
        f"{c['failed']} failed of {s['budget']['trials']}"
    )
    if best is not None:
        title += f" · best {s['objective']['metric']} {best['value']:.4f} (trial {best['trial']})"
    if s.get("ended") == "timeout":
        title += " · ended by its wall-clock budget"
    table = Table(
        "trial", "hyperparameters", "epochs", s["objective"]["metric"], "state", title=title
    )
    for t in s["trials"]:
        values = t["intermediate"]
        last = values[max(values, key=int)] if values else None
        value = t["value"] if t["value"] is not None else last
        state = {
            "completed": "[green]finished",
            "pruned": "[yellow]pruned",
            "failed": "[red]failed",
        }
        label = state.get(t["state"], "running")
        if t["state"] == "pruned":
            label += f" at epoch {t['epochs']}"
        table.add_row(
            str(t["number"]),
            ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in t["params"].items()
            ),
            str(t["epochs"] if t["epochs"] is not None else len(values)),
            "-" if value is None else f"{value:.4f}",
            label,
        )
    return table

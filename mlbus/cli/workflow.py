"""`mlbus pipelines apply|list`, `mlbus models promote|rollback|list` and `mlbus workflow`
(the trigger, policy and rollback service)."""

from __future__ import annotations

import getpass
import logging
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from mlbus.cli.common import app, console, err_console, kafka_config, settings
from mlbus.services import Service, service
from mlbus.settings import Settings

pipelines_app = typer.Typer(
    help="Pipelines: when to train, and how to promote.", no_args_is_help=True
)
models_app = typer.Typer(
    help="Models: versions, champions, manual decisions.", no_args_is_help=True
)
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(models_app, name="models")

log = logging.getLogger(__name__)


def _user() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"


def _json(value: object) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


@pipelines_app.command("apply")
def pipelines_apply(
    file: Annotated[
        Path,
        typer.Argument(
            help="pipeline definition (YAML)", exists=True, dir_okay=False, readable=True
        ),
    ],
    actor: Annotated[str | None, typer.Option(help="who applies it [default: user:$USER]")] = None,
) -> None:
    """Publish a pipeline definition as its next revision (nothing if it is unchanged)."""
    from mlbus.consumers.workflow.definitions import apply, parse

    limits = settings().limits
    text = file.read_text()
    parse(text, source=str(file), limits=limits)  # a bad file fails here, before Kafka is used
    applied = apply(kafka_config(), text, source=str(file), actor=actor or _user(), limits=limits)
    console.print(applied.message, highlight=False)
    if applied.published:
        console.print(f"event {applied.event_id}", highlight=False)


@pipelines_app.command("list")
def pipelines_list(
    json_out: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
) -> None:
    """Every pipeline's revision in force."""
    from mlbus.consumers.workflow.commands import list_pipelines

    found = list_pipelines(kafka_config())
    if json_out:
        _json(found)
        return
    table = Table("pipeline", "rev", "enabled", "dataset", "model", "family", "sweep", "policy")
    for p in found:
        sweep = " x ".join(f"{k}:{len(v)}" for k, v in p["sweep"].items()) or "-"
        policy = p["policy"]
        bars = ", ".join(f"{t['metric']} {t['op']} {t['value']:g}" for t in policy["thresholds"])
        summary = f"{policy['name']} v{policy['version']} ({bars or 'no thresholds'})"
        table.add_row(
            p["name"],
            str(p["revision"]),
            "yes" if p["enabled"] else "no",
            p["dataset"],
            p["model"],
            p["family"],
            sweep,
            summary,
        )
    console.print(table)


@models_app.command("list")
def models_list(
    json_out: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
) -> None:
    """Every model with its versions, its champion and what its replicas serve (a champion
    that failed to load is not serving), from the lineage store (as far as its
    projector has read the log: `mlbus up`, or `mlbus lineage project --stop-at-end`)."""
    from dataclasses import asdict

    from mlbus.consumers.lineage.queries import LineageQueries
    from mlbus.consumers.lineage.store import LineageStore

    with LineageStore.open(settings().metadata_url) as store:
        if not store.positions():
            err_console.print(
                "the lineage store has not read the log yet: run `mlbus up`, or "
                "`mlbus lineage project --stop-at-end`",
                highlight=False,
            )
        found = LineageQueries(store).models()
    if json_out:
        _json([asdict(m) for m in found])
        return
    table = Table("model", "version", "status", "serving", "test accuracy", "dataset", "note")
    for model in found:
        champion = model.champion
        for v in model.versions:
            accuracy = v.metrics.get("test.accuracy")
            note = v.rejected or ""
            if champion and v.status == "champion":
                note = f"{champion.actor}: {champion.reason}"
            if v.load_failure:  # promoted, but no replica could load it
                note = f"failed to load: {v.load_failure}"
            dataset = f"{v.dataset['name']}@{v.dataset['version'][:12]}" if v.dataset else "-"
            table.add_row(
                model.model,
                v.version,
                v.status,
                f"yes ({len(v.replicas)})" if v.serving else "no",
                "-" if accuracy is None else f"{accuracy:.4f}",
                dataset,
                escape(note),
            )
    console.print(table)


@models_app.command("promote")
def models_promote(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version (a unique prefix will do)")],
    reason: Annotated[str, typer.Option(help="why (recorded in the event)")],
    actor: Annotated[str | None, typer.Option(help="who [default: user:$USER]")] = None,
) -> None:
    """Promote a version by hand: publishes model.promoted with you as the actor."""
    from mlbus.consumers.workflow.commands import promote

    event = promote(kafka_config(), model, version, reason=reason, actor=actor or _user())
    console.print(
        f"promoted {model} {event.data.version} (was {event.data.previous_version}); "
        f"event {event.id}",
        highlight=False,
    )


@models_app.command("rollback")
def models_rollback(
    model: Annotated[str, typer.Argument(help="model name")],
    reason: Annotated[str, typer.Option(help="why (recorded in the event)")],
    to: Annotated[str | None, typer.Option(help="version [default: the previous good one]")] = None,
    actor: Annotated[str | None, typer.Option(help="who [default: user:$USER]")] = None,
) -> None:
    """Roll back by hand: model.promoted of an earlier version, rollback=true."""
    from mlbus.consumers.workflow.commands import rollback

    event = rollback(kafka_config(), model, to=to, reason=reason, actor=actor or _user())
    console.print(
        f"rolled back {model} from {event.data.previous_version} to "
        f"{event.data.version}; event {event.id}",
        highlight=False,
    )


@app.command("workflow")
def workflow(
    group: Annotated[
        str | None, typer.Option(help="consumer group [default: <topic prefix>mlbus-workflow]")
    ] = None,
    reevaluate: Annotated[
        bool,
        typer.Option(
            help="re-evaluate the champion on a candidate's test rows when they were trained "
            "on different data"
        ),
    ] = True,
) -> None:
    """Run the workflow manager: training triggers, promotion policy, automatic rollback.
    Without options, the same as `mlbus run workflow`."""
    _workflow(service("workflow"), settings(), group=group, reevaluate=reevaluate)


def run_workflow(manifest: Service, cfg: Settings) -> None:
    """The workflow manager in the foreground (`mlbus run workflow`)."""
    _workflow(manifest, cfg)


def _workflow(
    manifest: Service, cfg: Settings, *, group: str | None = None, reevaluate: bool = True
) -> None:
    from mlbus.consumers.workflow.service import WorkflowService

    group = group or manifest.group_id(cfg.topic_prefix)
    kafka = kafka_config(cfg)
    evaluator = None
    if reevaluate:
        from mlbus.consumers.workflow.evaluation import ChampionEvaluator
        from mlbus.storage import ObjectStore

        evaluator = ChampionEvaluator(kafka, ObjectStore.from_settings(cfg))
    console.print(f"workflow manager: group {group}", highlight=False)
    try:
        WorkflowService(
            kafka, group=group, evaluator=evaluator, limits=cfg.limits, settings=cfg.workflow
        ).run()
    finally:
        if evaluator is not None:
            evaluator.close()

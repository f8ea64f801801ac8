"""`mlbus pipelines apply|list`, `mlbus models promote|rollback|abort|traffic|list` and
`mlbus workflow` (the trigger, policy, rollout and rollback service)."""

from __future__ import annotations

import getpass
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

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


def _numbers(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: comma-separated integers, e.g. 10,50,100") from None


def _split(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        version, sep, weight = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[version.strip()] = int(weight)
        except ValueError:
            raise typer.BadParameter(
                f"--weights: VERSION=PERCENT pairs, e.g. 1=90,2=10; not {part!r}"
            ) from None
    return out


@models_app.command("promote")
def models_promote(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version (a unique prefix will do)")],
    reason: Annotated[str, typer.Option(help="why (recorded in the event)")],
    actor: Annotated[str | None, typer.Option(help="who [default: user:$USER]")] = None,
    canary: Annotated[
        int | None,
        typer.Option(help="roll out as a canary: this percent of requests first, then --steps"),
    ] = None,
    shadow: Annotated[
        bool, typer.Option("--shadow", help="roll out as a shadow: a copy of every request")
    ] = False,
    ab: Annotated[
        int | None, typer.Option("--ab", help="an A/B experiment: this percent, held")
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option(help="a canary's weights, e.g. 10,50,100 [default: the canary's, 100]"),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="percent by version, e.g. 1=90,2=10 (sums to 100)")
    ] = None,
    min_samples: Annotated[
        int | None,
        typer.Option(
            min=1, help="candidate requests a canary step needs [default: workflow settings]"
        ),
    ] = None,
) -> None:
    """Promote a version by hand: publishes model.promoted with you as the actor. With
    --canary, --shadow or --ab, starts a rollout of it instead (model.traffic); promoting
    the candidate of a rollout in progress completes it."""
    from mlbus.consumers.workflow.api import criteria_of
    from mlbus.consumers.workflow.commands import InvalidRollout, promote

    chosen = [
        name
        for name, given in (
            ("canary", canary is not None),
            ("shadow", shadow),
            ("ab", ab is not None),
        )
        if given
    ]
    if len(chosen) > 1:
        raise InvalidRollout(f"one strategy at a time, not {' and '.join(chosen)}")
    strategy = chosen[0] if chosen else ("canary" if steps else None)
    criteria = criteria_of(settings().workflow, min_samples) if strategy else None
    if min_samples is not None and strategy is None:
        raise InvalidRollout("--min-samples needs a strategy: --canary, --shadow or --ab")
    event = promote(
        kafka_config(),
        model,
        version,
        reason=reason,
        actor=actor or _user(),
        strategy=strategy,  # type: ignore[arg-type]  # one of the three literals, chosen above
        weight=canary if canary is not None else ab,
        weights=_split(weights),
        steps=_numbers(steps, "--steps"),
        criteria=criteria,
    )
    if event.type == "model.traffic":
        t = event.data
        split = "shadow (a copy of every request)" if t.shadow else t.weights
        console.print(
            f"{t.strategy} rollout of {model} {t.candidate} against {t.stable}: {split}"
            + (f", steps {t.steps}" if t.steps else "")
            + f"; rollout {t.rollout_id}",
            highlight=False,
        )
        return
    console.print(
        f"promoted {model} {event.data.version} (was {event.data.previous_version}); "
        f"event {event.id}",
        highlight=False,
    )


@models_app.command("abort")
def models_abort(
    model: Annotated[str, typer.Argument(help="model name")],
    reason: Annotated[str, typer.Option(help="why (recorded in the event)")],
    actor: Annotated[str | None, typer.Option(help="who [default: user:$USER]")] = None,
) -> None:
    """Abort the model's rollout in progress: all traffic back to its serving version."""
    from mlbus.consumers.workflow.commands import abort

    event = abort(kafka_config(), model, reason=reason, actor=actor or _user())
    console.print(
        f"aborted the rollout of {model} {event.data.candidate}: all traffic on "
        f"{event.data.stable}; event {event.id}",
        highlight=False,
    )


@models_app.command("traffic")
def models_traffic(
    model: Annotated[str, typer.Argument(help="model name")],
    json_out: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
) -> None:
    """The model's newest traffic split (model.traffic) and the analysis behind it; while a
    rollout is in progress, each version's figures so far in its current step (samples, error
    ratio, p99, accuracy when labelled, a shadow's agreement), by the canary's analysis."""
    from mlbus.consumers.workflow.api import comparison_json
    from mlbus.consumers.workflow.commands import comparison, traffic

    config = kafka_config()
    event = traffic(config, model)
    if event is None:
        err_console.print(f"model {model} has never had a rollout", highlight=False)
        raise typer.Exit(1)
    t = event.data
    compared = comparison(config, event)
    if json_out:
        found = None if compared is None else comparison_json(compared)
        _json({"event_id": event.id, **t.model_dump(mode="json"), "comparison": found})
        return
    split = "shadow" if t.shadow else ", ".join(f"{v}: {w}%" for v, w in t.weights.items())
    console.print(
        f"{model}: {t.strategy} rollout {t.rollout_id} {t.status}, {t.candidate} against "
        f"{t.stable} ({split}); step {t.step + 1} of {len(t.steps) or 1}; {t.actor}: "
        f"{escape(t.reason)}",
        highlight=False,
    )
    if compared is None:
        return
    table = Table("version", "samples", "server errors", "error ratio", "p99 ms", "labelled",
                  "accuracy", "agreement", title="so far in this step")  # fmt: skip
    versions = compared.analysis.get("versions")
    for version, f in (versions if isinstance(versions, dict) else {}).items():
        assert isinstance(f, dict)
        role = "candidate" if version == t.candidate else "stable"
        p99 = f.get("latency_p99")
        table.add_row(
            f"{version} ({role})",
            str(f.get("served")),
            str(f.get("errors")),
            _ratio(f.get("error_ratio")),
            "-" if not isinstance(p99, float | int) else f"{p99 * 1000:.1f}",
            str(f.get("labelled")),
            _ratio(f.get("accuracy")),
            _ratio(f.get("agreement")),
        )
    console.print(table)
    console.print(f"{compared.verdict}: {escape(compared.reason)}", highlight=False)


def _ratio(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float | int) else "-"


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

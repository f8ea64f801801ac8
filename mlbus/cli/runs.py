"""`mlbus runs …`: experiments — training runs listed, shown and compared side by side, read
from the lineage store (its projection of the `training.*` topics; `mlbus run lineage` keeps
it current), never by replaying the log."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from mlbus.cli.common import app, console, settings

if TYPE_CHECKING:
    from mlbus.consumers.lineage.runs import Comparison, RunDetail, RunQueries, RunSummary

runs_app = typer.Typer(
    help="Experiments: training runs listed, shown and compared (from the lineage store).",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")

SPARK = "▁▂▃▄▅▆▇█"


def _queries() -> RunQueries:
    from mlbus.consumers.lineage.runs import RunQueries
    from mlbus.consumers.lineage.store import LineageStore

    return RunQueries(LineageStore.open(settings().metadata_url))


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


def sparkline(values: Sequence[float | None], low: float, high: float) -> str:
    """One character per value on a shared scale [low, high] (so that the lines of several
    runs compare); a missing value is a space."""
    span = high - low
    out = []
    for v in values:
        if v is None or math.isnan(v):
            out.append(" ")
        elif span <= 0:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))])
    return "".join(out)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _status(status: str) -> str:
    color = {"completed": "green", "failed": "red", "running": "yellow"}.get(status, "dim")
    return f"[{color}]{status}[/]"


def _params(hyper: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(hyper.items()))


@runs_app.command("list")
def list_runs(
    model: Annotated[str | None, typer.Option("--model", help="only this model's runs")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="requested, running, completed or failed"),
    ] = None,
    sort: Annotated[
        str | None, typer.Option("--sort", help="a metric (e.g. test.accuracy): best first")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Training runs, newest first (or best first by --sort)."""
    runs = _queries().list(model, status, sort=sort, limit=limit)
    if json_out:
        for run in runs:
            _print_json(asdict(run))
        return
    metric = sort or _headline(runs)
    table = Table("run", "model", "status", "family", "hyperparameters", "epochs", metric or "")
    for run in runs:
        table.add_row(
            run.run_id[:12],
            escape(run.model) + (f"@{run.version[:10]}" if run.version else ""),
            _status(run.status),
            escape(run.family or "-"),
            escape(_params(run.hyperparameters)),
            f"{_num(run.epochs)}/{_num(run.max_epochs)}",
            _num(run.metrics.get(metric)) if metric else "",
        )
    console.print(table if runs else "no runs")


def _headline(runs: Sequence[RunSummary]) -> str | None:
    """The metric a listing shows: the test-split metric (not a loss) most runs have."""
    counts: dict[str, int] = {}
    for run in runs:
        for name in run.metrics:
            if name.startswith("test.") and not name.endswith("loss"):
                counts[name] = counts.get(name, 0) + 1
    return max(sorted(counts), key=lambda n: counts[n], default=None)


@runs_app.command("show")
def show(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix), or MODEL@VERSION")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One run: what was asked (hyperparameters, dataset, who), its per-epoch curves, final
    metrics, confusion matrix, artifact and the decisions on the version it produced."""
    detail = _queries().show(run)
    if json_out:
        _print_json(asdict(detail))
        return
    _print_detail(detail)


def _print_detail(d: RunDetail) -> None:
    console.print(f"[bold]run {d.run_id}[/]  {_status(d.status)}")
    facts = Table.grid(padding=(0, 2))
    for name, value in (
        ("model", d.model + (f"@{d.version}" if d.version else "")),
        ("family", d.family),
        ("dataset", d.dataset),
        ("hyperparameters", _params(d.hyperparameters)),
        ("seed", d.seed),
        ("requested by", d.requested_by),
        ("pipeline", d.pipeline),
        ("sweep", d.sweep_id),
        ("requested at", d.requested_at),
        ("finished at", d.finished_at),
        ("epochs", f"{_num(d.epochs)}/{_num(d.max_epochs)}"),
        ("duration", f"{d.duration_seconds:.1f} s" if d.duration_seconds is not None else None),
        ("worker", d.worker),
        ("code", d.code_version),
        ("failure", d.failure),
    ):
        if value is not None:
            facts.add_row(f"[dim]{name}[/]", escape(str(value)))
    if d.artifact:
        facts.add_row("[dim]artifact[/]", escape(f"{d.artifact['uri']} {d.artifact['sha256']}"))
    console.print(facts)
    if d.final_metrics:
        splits = sorted(d.final_metrics)
        names = sorted({n for s in splits for n in d.final_metrics[s]})
        table = Table("metric", *splits, title="final metrics")
        for n in names:
            table.add_row(n, *(_num(d.final_metrics[s].get(n)) for s in splits))
        console.print(table)
    if d.curves:
        _print_curves([d], [n for e in d.curves for n in e.metrics])
    if d.confusion_matrix:
        labels = d.labels or [str(i) for i in range(len(d.confusion_matrix))]
        table = Table("true \\ predicted", *labels, title="confusion matrix (test)")
        for label, row in zip(labels, d.confusion_matrix, strict=False):
            table.add_row(label, *(str(v) for v in row))
        console.print(table)
    for x in d.decisions:
        policy = f" under {x.policy}" if x.policy else ""
        console.print(f"{x.kind} {x.version[:12]} by {escape(x.actor)}{policy}: {escape(x.reason)}")


def _print_curves(runs: Sequence[RunDetail], names: Sequence[str]) -> None:
    """A sparkline per run and metric, each metric on one scale across the runs."""
    table = Table("curve", "run", "per epoch", "first", "last", title="learning curves")
    for name in dict.fromkeys(names):
        series = [[e.metrics.get(name) for e in r.curves] for r in runs]
        seen = [v for s in series for v in s if v is not None and not math.isnan(v)]
        if not seen:
            continue
        low, high = min(seen), max(seen)
        for run, values in zip(runs, series, strict=True):
            have = [v for v in values if v is not None]
            table.add_row(
                name,
                run.run_id[:12],
                sparkline(values, low, high),
                _num(have[0]) if have else "-",
                _num(have[-1]) if have else "-",
            )
    console.print(table)


@runs_app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="two or more runs (ids, prefixes, M@V)")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Runs side by side: hyperparameters and metrics (what differs in yellow, the best run
    of each metric in green) and their learning curves."""
    comparison = _queries().compare(runs)
    if json_out:
        _print_json(asdict(comparison))
        return
    _print_comparison(comparison)


def _print_comparison(c: Comparison) -> None:
    table = Table("", *(f"{r.run_id[:12]}\n{r.status}" for r in c.runs))
    table.add_row("[bold]model", *(escape(r.model) for r in c.runs))
    table.add_row("[bold]dataset", *(escape(r.dataset or "-") for r in c.runs))
    table.add_section()
    for row in c.hyperparameters:
        style = "bold yellow" if row.differs else "dim"
        table.add_row(f"[{style}]{escape(row.name)}", *(f"[{style}]{_num(v)}" for v in row.values))
    table.add_section()
    for row in c.metrics:
        cells = []
        for i, v in enumerate(row.values):
            if row.best == i:
                cells.append(f"[bold green]{_num(v)}")
            elif row.differs:
                cells.append(f"[yellow]{_num(v)}")
            else:
                cells.append(f"[dim]{_num(v)}")
        table.add_row(escape(row.name), *cells)
    console.print(table)
    if c.policy_metric:
        console.print(f"[dim]policy metric: {escape(c.policy_metric)}[/]")
    if c.curves:
        _print_curves(c.runs, c.curves)

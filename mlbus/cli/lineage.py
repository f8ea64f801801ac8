"""`mlbus lineage …` and `mlbus audit`: the metadata and lineage store (a projection of the
log), its rebuild, lineage questions, and the audit of a model version, or of one request,
against the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.tree import Tree

from mlbus.cli.common import app, console, err_console, kafka_config, settings
from mlbus.errors import MlbusError
from mlbus.refs import parse, resolve
from mlbus.services import Service, service
from mlbus.settings import Settings

if TYPE_CHECKING:
    from mlbus.consumers.lineage.store import LineageStore

lineage_app = typer.Typer(
    help="Metadata and lineage store: a projection of the log, and questions asked of it.",
    no_args_is_help=True,
)
app.add_typer(lineage_app, name="lineage")

log = logging.getLogger("mlbus.consumers.lineage")

Schema = Annotated[
    str | None,
    typer.Option("--schema", help="PostgreSQL schema of the store [default: mlbus_lineage]"),
]
AsOf = Annotated[
    str | None, typer.Option("--as-of", help="as known at this time (ISO 8601, UTC if naive)")
]


def _store(schema: str | None = None, *, create: bool = True) -> LineageStore:
    from mlbus.consumers.lineage.store import LineageStore

    url = settings().metadata_url
    return LineageStore.open(url, schema=schema) if create else LineageStore(url, schema=schema)


def _ref(
    store: LineageStore, ref: str, what: str, *, need_version: bool = False
) -> tuple[str, str | None]:
    """What the user typed, its version prefix resolved against the versions the store
    knows (a name it does not know is left to the query, which says so)."""
    from mlbus.consumers.lineage.queries import LineageQueries

    parsed = parse(ref, what=what, need_version=need_version)
    if parsed.version is None:
        return parsed.name, None
    queries = LineageQueries(store)
    if what == "MODEL":
        known = queries.model_versions(parsed.name)
    else:
        known = queries.dataset_versions(parsed.name)
    if not known:
        return parsed.name, parsed.version
    return parsed.name, resolve(parsed.name, parsed.version, known, kind=what.lower())


def _archive_records(topics: Sequence[str]) -> Iterator[Any]:
    """The archive's records (the archive component's reader, imported only when asked)."""
    try:
        from mlbus.consumers.archive.reader import read_archive
    except ImportError as e:
        raise MlbusError(
            f"--source archive needs consumers.archive.reader.read_archive, which is not "
            f"available in this installation ({e})"
        ) from None
    from mlbus.storage import ObjectStore

    return read_archive(ObjectStore.from_settings(settings()), list(topics))


def _records(source: str, topics: Sequence[str]) -> Iterator[Any]:
    if source == "archive":
        return _archive_records(topics)
    if source != "kafka":
        raise MlbusError(f"--source {source!r}: use kafka or archive")
    from mlbus.kafka.reader import read_log

    return read_log(kafka_config(), topics)


# -- the projector and the store ----------------------------------------------------------------


@lineage_app.command("project")
def project(
    group: Annotated[
        str | None, typer.Option(help="consumer group [default: <topic prefix>mlbus-lineage]")
    ] = None,
    batch: Annotated[int, typer.Option(help="records per SQL transaction", min=1)] = 5000,
    stop_at_end: Annotated[
        bool, typer.Option("--stop-at-end", help="exit once every partition is read to its end")
    ] = False,
    schema: Schema = None,
) -> None:
    """Run the live projector: consume the lineage topics into the store, resuming from the
    positions stored with the rows. Exits 0 on SIGTERM/SIGINT. Without options, the same as
    `mlbus run lineage`."""
    _project(service("lineage"), settings(), group, batch, stop_at_end, schema)


def run_lineage(manifest: Service, cfg: Settings) -> None:
    """The live projector in the foreground (`mlbus run lineage`)."""
    _project(manifest, cfg, None, 5000, False, None)


def _project(
    manifest: Service,
    cfg: Settings,
    group: str | None,
    batch: int,
    stop_at_end: bool,
    schema: str | None,
) -> None:
    from mlbus.consumers.lineage.live import LiveProjector

    store = _store(schema)
    group = group or manifest.group_id(cfg.topic_prefix)
    projector = LiveProjector(
        kafka_config(cfg),
        store,
        group=group,
        batch_size=batch,
        on_new_log=cfg.positions.on_new_log,
    )
    log.info("lineage projector: %s → %s", ", ".join(projector.topics), _display(store.url))
    stats = projector.run(stop_at_end=stop_at_end)
    log.info(
        "lineage projector stopped: %d records, %d projected, %d skipped (undecodable)",
        stats.records,
        stats.projected,
        stats.skipped,
    )
    store.close()


def _display(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@lineage_app.command("dump")
def dump(schema: Schema = None) -> None:
    """Print the whole store as canonical JSON (sorted; no surrogate keys, no wall clock of
    the projection): two stores of the same log print the same bytes."""
    import sys

    store = _store(schema)
    sys.stdout.buffer.write(store.dump_json() + b"\n")
    store.close()


@lineage_app.command("rebuild")
def rebuild(
    source: Annotated[str, typer.Option(help="kafka or archive")] = "kafka",
    batch: Annotated[int, typer.Option(help="records per batch to the writer", min=1)] = 5000,
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="swap in an empty result over a non-empty store")
    ] = False,
    schema: Schema = None,
) -> None:
    """Project the whole log (from offset 0, or from the archive) into a fresh store, then
    swap it in. Stop the live projector first; it resumes from the rebuilt positions."""
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from mlbus.consumers.lineage.projector import TOPICS
    from mlbus.consumers.lineage.rebuild import rebuild as project_all
    from mlbus.consumers.lineage.store import discard, staging_for, swap_in

    records = _records(source, TOPICS)
    store = _store(schema, create=False)
    staging = staging_for(store)
    started = time.monotonic()
    try:
        with Progress(
            TextColumn("[bold]rebuilding from {task.fields[source]}"),
            TextColumn("{task.fields[records]:,} records"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("rebuild", total=None, source=source, records=0)
            stats = project_all(
                staging,
                records,
                batch_size=batch,
                progress=lambda n: bar.update(task, records=n),
            )
    except BaseException:
        discard(staging)
        raise
    if stats.records == 0 and not allow_empty and _has_events(store):
        # an empty source (wrong prefix, empty archive) must not wipe a good store
        discard(staging)
        raise MlbusError(
            f"the {source} source has no records of the lineage topics; the store was left as "
            "it is (--allow-empty to replace it anyway)"
        )
    swap_in(staging, store)
    seconds = time.monotonic() - started
    console.print(
        f"rebuilt from {source}: {stats.records:,} records, {stats.projected:,} events "
        f"projected, {stats.skipped:,} skipped (undecodable) in {seconds:.1f}s"
    )


def _has_events(store: Any) -> bool:
    try:
        return store.counts()["events"] > 0
    except MlbusError:  # no store there yet
        return False


# -- questions ----------------------------------------------------------------------------------


def _output(
    result: Any,
    json_out: bool,
    dot: bool,
    mermaid: bool,
    graph: Callable[[Any], Any],
    tree: Callable[[Any], Any],
) -> None:
    from mlbus.consumers.lineage.graph import to_dot, to_mermaid

    if sum((json_out, dot, mermaid)) > 1:
        raise MlbusError("choose one of --json, --dot, --mermaid")
    if json_out:
        print(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2).decode())
    elif dot:
        print(to_dot(graph(result)), end="")
    elif mermaid:
        print(to_mermaid(graph(result)), end="")
    else:
        console.print(tree(result))


Json = Annotated[bool, typer.Option("--json", help="JSON")]
Dot = Annotated[bool, typer.Option("--dot", help="Graphviz DOT")]
Mermaid = Annotated[bool, typer.Option("--mermaid", help="Mermaid flowchart")]


@lineage_app.command("show")
def show(
    ref: Annotated[str, typer.Argument(metavar="MODEL[@VERSION]")],
    as_of: AsOf = None,
    json_out: Json = False,
    dot: Dot = False,
    mermaid: Mermaid = False,
    schema: Schema = None,
) -> None:
    """Upstream lineage of a model version (default: the one serving, at --as-of if given):
    run, dataset versions and their parents, hyperparameters, code, who asked, decisions."""
    from mlbus.consumers.lineage.graph import upstream_graph
    from mlbus.consumers.lineage.queries import LineageQueries, parse_time

    store = _store(schema)
    model, version = _ref(store, ref, "MODEL")
    when = parse_time(as_of)
    result = LineageQueries(store).upstream(model, version, when)
    _output(result, json_out, dot, mermaid, upstream_graph, _upstream_tree)


@lineage_app.command("downstream")
def downstream(
    ref: Annotated[str, typer.Argument(metavar="DATASET[@VERSION]")],
    as_of: AsOf = None,
    json_out: Json = False,
    dot: Dot = False,
    mermaid: Mermaid = False,
    schema: Schema = None,
) -> None:
    """Every run and model version that used a dataset (version), and where they serve now."""
    from mlbus.consumers.lineage.graph import downstream_graph
    from mlbus.consumers.lineage.queries import LineageQueries, parse_time

    store = _store(schema)
    name, version = _ref(store, ref, "DATASET")
    result = LineageQueries(store).downstream(name, version, parse_time(as_of))
    _output(result, json_out, dot, mermaid, downstream_graph, _downstream_tree)


@lineage_app.command("why")
def why(
    ref: Annotated[str, typer.Argument(metavar="MODEL@VERSION")],
    as_of: AsOf = None,
    json_out: Json = False,
    schema: Schema = None,
) -> None:
    """The promotion and rejection decisions of a version, with their policy and evidence,
    and the rollouts of it as a candidate, each change with its reason."""
    from mlbus.consumers.lineage.api import rollout_json
    from mlbus.consumers.lineage.queries import LineageQueries, parse_time
    from mlbus.consumers.lineage.rollouts import RolloutQueries

    store = _store(schema)
    model, version = _ref(store, ref, "MODEL", need_version=True)
    assert version is not None
    when = parse_time(as_of)
    result = LineageQueries(store).why(model, version, when)
    rolled = [r for r in RolloutQueries(store).rollouts(model, when) if r.candidate == version]
    if json_out:
        document = asdict(result) | {"rollouts": [rollout_json(r) for r in rolled]}
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    if not result.decisions and not rolled:
        console.print(f"{model}@{version}: trained, but no promotion or rejection recorded")
    for d in result.decisions:
        console.print(_decision_line(d))
        for key, value in sorted(d.evidence.items()):
            console.print(f"    evidence {key} = {orjson.dumps(value).decode()}")
    for r in rolled:
        console.print(
            f"[bold]{r.strategy}[/] rollout {r.rollout_id} beside {escape(r.stable)}: {r.status}"
        )
        for c in r.changes:
            console.print("  " + escape(change_line(c)))


@lineage_app.command("history")
def history(
    model: Annotated[str, typer.Argument()],
    as_of: AsOf = None,
    json_out: Json = False,
    schema: Schema = None,
) -> None:
    """Promotions, rejections and rollbacks of a model, oldest first."""
    from mlbus.consumers.lineage.queries import LineageQueries, parse_time

    result = LineageQueries(_store(schema)).history(model, parse_time(as_of))
    if json_out:
        print(orjson.dumps([asdict(d) for d in result], option=orjson.OPT_INDENT_2).decode())
        return
    for d in result:
        console.print(f"{d.provenance.time}  " + _decision_line(d))


@lineage_app.command("rollouts")
def rollouts(
    model: Annotated[str, typer.Argument()],
    as_of: AsOf = None,
    json_out: Json = False,
    schema: Schema = None,
) -> None:
    """The split in force and every rollout of a model (canary, shadow, A/B): each change of
    weights with who decided it, why, and the analysis in brief."""
    from mlbus.consumers.lineage.api import rollout_json, split_json
    from mlbus.consumers.lineage.queries import parse_time
    from mlbus.consumers.lineage.rollouts import RolloutQueries

    q = RolloutQueries(_store(schema))
    when = parse_time(as_of)
    split, found = q.split(model, when), q.rollouts(model, when)
    if json_out:
        document = {"split": split_json(split), "rollouts": [rollout_json(r) for r in found]}
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    console.print(f"{escape(model)}: " + escape(split_line(split)))
    for r in found:
        console.print(
            f"[bold]{r.strategy}[/] rollout {r.rollout_id} of {escape(r.candidate)} beside "
            f"{escape(r.stable)}: {r.status} [dim]({r.started} → {r.ended or 'in progress'})[/]"
        )
        for c in r.changes:
            console.print("  " + escape(change_line(c)))


def split_line(split: Any) -> str:
    weights = ", ".join(f"{v} {w}%" for v, w in split.weights.items()) or "nothing serves"
    line = f"split {weights}"
    if split.shadow:
        line += f", shadow {split.shadow}"
    c = split.change
    if c is not None:
        step = f" step {c.step + 1}/{len(c.steps)}" if c.steps else ""
        line += f" ({c.strategy} rollout {c.rollout_id}{step}, {c.status} by {c.actor})"
    return line


def change_line(c: Any) -> str:
    weights = ", ".join(f"{v} {w}%" for v, w in c.weights.items())
    step = f" step {c.step + 1}/{len(c.steps)}" if c.steps else ""
    return f"{c.provenance.time} {c.status}{step} [{weights}] by {c.actor}: {c.reason}"


def _decision_line(d: Any) -> str:
    kind = (
        "[red]rejected[/]"
        if d.kind == "rejected"
        else ("[yellow]rolled back to[/]" if d.rollback else "[green]promoted[/]")
    )
    policy = f" under policy {d.policy}" if d.policy else ""
    return (
        f"{kind} {d.model}@{d.version} by {d.actor}{policy}: {d.reason} "
        f"[dim]({d.provenance.time}, event {d.provenance.event_id})[/]"
    )


def _dataset_branch(parent: Tree, node: Any) -> None:
    if not node.known:
        parent.add(
            f"[bold red]{node.name}@{node.version}: unknown upstream[/] "
            "[dim](no dataset.created for it)[/]"
        )
        return
    branch = parent.add(
        f"[cyan]dataset[/] {node.name}@{node.version} [dim]{node.uri} · {node.num_rows:,} rows · "
        f"by {node.created_by or '?'} · event {node.provenance.event_id}[/]"
    )
    for p in node.parents:
        _dataset_branch(branch, p)
    if node.truncated:
        branch.add("[dim]… (ancestry cut: too deep or cyclic)[/]")


def _upstream_tree(up: Any) -> Tree:
    serving = " [green](serving)[/]" if up.serving else ""
    if up.load_failure:
        serving = f" [red](not serving: failed to load: {escape(up.load_failure)})[/]"
    as_of = f" as of {up.as_of}" if up.as_of else ""
    root = Tree(f"[bold]{up.model}@{up.version}[/]{serving}{as_of}")
    r = up.run
    if r.run_id is None:
        root.add("[bold red]run: unknown upstream[/] [dim](no training events for it)[/]")
    else:
        run = root.add(f"[yellow]run[/] {r.run_id} [dim]({r.status})[/]")
        run.add(
            f"requested by {r.requested_by or '?'} · pipeline {r.pipeline or '-'} · "
            f"request {r.request_id or '?'}"
        )
        run.add(
            f"family {r.family or '?'} · hyperparameters "
            f"{orjson.dumps(r.hyperparameters, option=orjson.OPT_SORT_KEYS).decode()} · "
            f"seed {r.seed}"
        )
        run.add(
            f"code {r.code_version or '?'} ({r.git_commit or 'no commit'}) · "
            f"worker {r.worker or '?'} · epochs {r.epochs}"
        )
        if r.metrics:
            run.add(f"metrics {orjson.dumps(r.metrics, option=orjson.OPT_SORT_KEYS).decode()}")
        if r.failure:
            run.add(f"[red]failed: {r.failure}[/]")
        if r.artifact_uri:
            run.add(f"artifact {r.artifact_uri} [dim]{r.artifact_sha256}[/]")
        for d in up.datasets:
            _dataset_branch(run, d)
        if not up.datasets:
            run.add("[bold red]dataset: unknown upstream[/]")
    if up.decisions:
        decisions = root.add("decisions")
        for d in up.decisions:
            decisions.add(_decision_line(d))
    if up.deployments:
        deployed = root.add("deployments")
        for d in up.deployments:
            deployed.add(f"{d.replica}: {d.status} [dim]({d.provenance.time})[/]")
    return root


def _downstream_tree(down: Any) -> Tree:
    root = Tree(f"[bold]{down.dataset}[/]" + (f" as of {down.as_of}" if down.as_of else ""))
    for v in down.versions:
        label = f"[cyan]{v.name}@{v.version}[/]" + ("" if v.known else " [red](unknown)[/]")
        branch = root.add(label)
        for child in v.derived:
            branch.add(f"derived → {child.removeprefix('dataset:')}")
        for u in v.uses:
            where = ""
            if u.serving_now:
                where = " [green]serving[/]"
            if u.replicas:
                where += f" on {', '.join(u.replicas)}"
            model = f"{u.model}@{u.version}" if u.version else u.model
            branch.add(
                f"run {u.run_id or '-'} ({u.status}) → {model}{where}"
                + (f" [dim]{', '.join(u.decisions)}[/]" if u.decisions else "")
            )
    return root


# -- audit --------------------------------------------------------------------------------------


@app.command("audit")
def audit(
    ref: Annotated[str | None, typer.Argument(metavar="MODEL@VERSION | MODEL")] = None,
    request: Annotated[
        str | None,
        typer.Option(
            "--request",
            help="audit one request id instead: which version answered it, as what part of "
            "the split (stable, a rollout's candidate, a shadow), and who decided that "
            "(MODEL, if given, narrows the search)",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="with --request: read inference.logged from this time (ISO 8601)"),
    ] = None,
    source: Annotated[str, typer.Option(help="verify against kafka or archive")] = "kafka",
    json_out: Json = False,
    schema: Schema = None,
) -> None:
    """Every event in a model version's lineage, in time order with ids, each verified to
    still be in the log (or the archive) with the same content hash. Exit 1 if any is not.
    With --request: which version answered that request (from inference.logged), as what
    part of the split, the rollout and its weights then, the promotion behind it, and the
    events of all that, verified the same way."""
    from mlbus.consumers.lineage.audit import plan, topics_of, verify

    store = _store(schema)
    if request is not None:
        _audit_request(store, request, ref, since, source, json_out)
        return
    if ref is None:
        raise MlbusError("name MODEL@VERSION, or --request ID")
    model, version = _ref(store, ref, "MODEL", need_version=True)
    assert version is not None
    report = plan(store, model, version)
    report = verify(report, _records(source, topics_of(report)))
    if json_out:
        print(
            orjson.dumps(
                asdict(report) | {"ok": report.ok, "counts": report.counts},
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    else:
        _print_events(report)
        for name in report.unknown_upstream:
            console.print(f"[bold red]unknown upstream:[/] {name} (no dataset.created for it)")
        counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts.items()))
        (console if report.ok else err_console).print(
            f"{model}@{version}: {len(report.events)} events ({counts}) against {source}"
        )
    if not report.ok:
        raise typer.Exit(1)


def _print_events(report: Any) -> None:
    for e in report.events:
        mark = {
            "verified": "[green]✓[/]",
            "missing": "[red]✗ missing[/]",
            "changed": "[red]✗ changed[/]",
        }.get(e.status, "?")
        console.print(
            f"{mark} {e.time} {e.type:<20} {e.event_id} [dim]{e.topic}/{e.partition}@"
            f"{e.offset} sha256:{e.sha256[:12]}…[/]" + (f" ({e.detail})" if e.detail else "")
        )


def _audit_request(
    store: Any, request_id: str, model: str | None, since: str | None, source: str, json_out: bool
) -> None:
    from mlbus.consumers.lineage.api import request_json
    from mlbus.consumers.lineage.audit import REQUEST_TOPICS, request_plan, topics_of, verify
    from mlbus.consumers.lineage.queries import parse_time

    start = parse_time(since)
    if start is not None and source == "kafka":
        from mlbus.kafka.reader import read_log

        logged: Any = read_log(
            kafka_config(), REQUEST_TOPICS, since_ms=int(start.timestamp() * 1000)
        )
    else:
        logged = _records(source, REQUEST_TOPICS)
    done = request_plan(store, request_id, logged, model)
    if not done.answers:
        err_console.print(f"no inference.logged record of request {request_id} (it is sampled)")
        raise typer.Exit(1)
    assert done.report is not None
    verify(done.report, _records(source, topics_of(done.report)))
    if json_out:
        print(orjson.dumps(request_json(done), option=orjson.OPT_INDENT_2).decode())
    else:
        for a in done.answers:
            s = a.served
            answer = (
                "answered (a shadow's copy, never returned)"
                if s.role == "shadow"
                else ("answered" if a.ok else f"failed ({a.status or 'error'})")
            )
            console.print(
                f"request {escape(request_id)} {answer} by [bold]{escape(s.model)}@"
                f"{escape(s.version)}[/] on {escape(a.replica)} at {s.at}, as {s.role}"
            )
            console.print("  " + escape(split_line(s.split)))
            if s.rollout is not None:
                for c in s.rollout.changes:
                    console.print("  " + escape(change_line(c)))
            if s.promotion is not None:
                console.print("  " + _decision_line(s.promotion))
        _print_events(done.report)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(done.report.counts.items()))
        (console if done.ok else err_console).print(
            f"request {request_id}: {len(done.report.events)} events ({counts}) against {source}"
        )
    if not done.ok:
        raise typer.Exit(1)

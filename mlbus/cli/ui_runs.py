"""The experiment pages of `/ui`: runs (filtered by model and status, sorted by a metric,
selected for comparison; a search's trials grouped under their search, with its objective
plotted by trial), one run, runs compared (hyperparameters and metrics side by side,
learning curves overlaid), a search (its trials, the objective by trial, the epoch each
pruned one stopped after), and a model (its versions, the decisions on them with policy and
evidence, links to runs and lineage). Runs and models are queries of the lineage store;
searches come from the tuning state the control plane keeps from the log (`Searches`,
caught up per page view). Drawn on the server: plain HTML forms and SVG, no JavaScript,
nothing fetched from the internet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from mlbus.cli.charts import Series, TrialPoint, color, line_chart, trial_chart
from mlbus.cli.ui import page
from mlbus.errors import MlbusError

if TYPE_CHECKING:
    from mlbus.consumers.lineage.entities import Decision, ModelSummary
    from mlbus.consumers.lineage.runs import Comparison, RunDetail, RunSummary
    from mlbus.consumers.tuning.api import Searches

STATUSES = ("requested", "running", "completed", "failed")


def _q(value: str) -> str:
    return quote(value, safe="")


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else escape(str(value))


def _params(hyper: dict[str, Any]) -> str:
    return escape(" ".join(f"{k}={v}" for k, v in sorted(hyper.items())))


def run_link(run_id: str) -> str:
    return f"<a href='/ui/runs/{_q(run_id)}'><code>{escape(run_id[:12])}</code></a>"


def model_link(model: str) -> str:
    return f"<a href='/ui/models/{_q(model)}'>{escape(model)}</a>"


def _status(status: str) -> str:
    return f"<span class='status-{escape(status)}'>{escape(status)}</span>"


def _options(values: Sequence[str], chosen: str | None, empty: str) -> str:
    out = [f"<option value=''>{escape(empty)}</option>"]
    for v in values:
        selected = " selected" if v == chosen else ""
        out.append(f"<option value='{escape(v)}'{selected}>{escape(v)}</option>")
    return "".join(out)


def search_link(search_id: str) -> str:
    return f"<a href='/ui/searches/{_q(search_id)}'><code>{escape(search_id[:12])}</code></a>"


def _last_value(trial: dict[str, Any]) -> float | None:
    """A completed trial's objective; otherwise its newest epoch's (None: none reported)."""
    if trial["value"] is not None:
        return float(trial["value"])
    epochs = trial["intermediate"]
    return float(epochs[max(epochs, key=int)]) if epochs else None


def search_chart(s: dict[str, Any]) -> str:
    """The objective by trial number of one search (its summary, as GET /searches/{id})."""
    objective = s["objective"]
    points = [TrialPoint(t["number"], t["state"], _last_value(t), t["run_id"]) for t in s["trials"]]
    return trial_chart(
        f"{objective['metric']} by trial ({objective['direction']})",
        points,
        maximize=objective["direction"] == "max",
    )


def _search_line(s: dict[str, Any]) -> str:
    c, best = s["counts"], s["best"]
    shown = f"best {_num(best['value'])} (trial {best['trial']})" if best else "no completed trial"
    state = "finished" if s["finished"] else "running"
    return (
        f"{search_link(s['search_id'])} · {model_link(s['model'])} · {escape(s['sampler'])} + "
        f"{escape(s['pruner'])} · {c['requested']}/{s['budget']['trials']} trials: "
        f"{c['completed']} completed, {c['pruned']} pruned, {c['failed']} failed, "
        f"{c['running']} running · {shown} · {state}"
    )


def _trial_state(trial: dict[str, Any]) -> str:
    if trial["state"] == "pruned":
        return (
            f"<span class='status-pruned'>pruned</span> <span class='muted'>after epoch "
            f"{_num(trial['epochs'] or trial['pruned_at_epoch'])}</span>"
        )
    return _status(trial["state"])


def runs_page(
    runs: list[RunSummary],
    every: list[RunSummary],
    model: str | None,
    status: str | None,
    sort: str | None,
    searches: Sequence[dict[str, Any]] = (),
    unavailable: str | None = None,
) -> str:
    models = sorted({r.model for r in every})
    metrics = sorted({m for r in every for m in r.metrics})
    shown = sort or next((m for m in metrics if m.startswith("test.")), None)
    filters = (
        "<form class='filters' method='get' action='/ui/runs'>"
        f"<label>model <select name='model'>{_options(models, model, 'all')}</select></label> "
        f"<label>status <select name='status'>{_options(STATUSES, status, 'any')}</select></label> "
        f"<label>sort by <select name='sort'>{_options(metrics, sort, 'newest first')}</select>"
        "</label> <button type='submit'>apply</button></form>"
    )
    trials = {t["run_id"]: (s, t) for s in searches for t in s["trials"]}
    # A search's trials stay together, under a row naming the search, where its first
    # listed trial is; other runs keep their place.
    groups: dict[str, list[str]] = {}
    order: list[tuple[str, str]] = []  # ("run", its row) or ("search", its id)
    for r in runs:
        found = trials.get(r.run_id)
        model_cell = model_link(r.model)
        if r.version:
            model_cell += f" <span class='muted'>@{escape(r.version[:10])}</span>"
        run_cell, status_cell = run_link(r.run_id), _status(r.status)
        if found is not None:
            run_cell += f" <span class='muted'>trial {found[1]['number']}</span>"
            status_cell = _trial_state(found[1])
        row = (
            f"<tr><td><input type='checkbox' name='ids' value='{escape(r.run_id)}' "
            f"aria-label='select {escape(r.run_id)}'></td><td>{run_cell}</td>"
            f"<td>{model_cell}</td><td>{status_cell}</td><td>{escape(r.family or '-')}</td>"
            f"<td>{_params(r.hyperparameters)}</td>"
            f"<td>{_num(r.epochs)}/{_num(r.max_epochs)}</td>"
            f"<td>{_num(r.metrics.get(shown)) if shown else ''}</td>"
            f"<td class='muted'>{escape((r.requested_at or '')[:19])}</td></tr>"
        )
        if found is None:
            order.append(("run", row))
            continue
        sid = found[0]["search_id"]
        if sid not in groups:
            groups[sid] = []
            order.append(("search", sid))
        groups[sid].append(row)
    by_id = {s["search_id"]: s for s in searches}
    body, plain = [], []
    for kind, item in order:
        if kind == "run":
            plain.append(item)
            continue
        if plain:
            body.append(f"<tbody>{''.join(plain)}</tbody>")
            plain = []
        body.append(
            f"<tbody class='search' data-search='{escape(item)}'><tr class='search-head'>"
            f"<th colspan='9'>search {_search_line(by_id[item])}</th></tr>"
            f"{''.join(groups[item])}</tbody>"
        )
    if plain:
        body.append(f"<tbody>{''.join(plain)}</tbody>")
    table = (
        "<form method='get' action='/ui/runs/compare'><table class='runs'><thead><tr><th></th>"
        "<th>run</th><th>model</th><th>status</th><th>family</th><th>hyperparameters</th>"
        f"<th>epochs</th><th>{escape(shown or '')}</th><th>requested</th></tr></thead>"
        + ("".join(body) or "<tbody><tr><td colspan='9'>no runs</td></tr></tbody>")
        + "</table><p><button type='submit'>compare selected</button></p></form>"
    )
    listed = [by_id[sid] for sid in groups]
    section = ""
    if listed:
        charts = "".join(
            f"<div class='search-chart' data-search='{escape(s['search_id'])}'>"
            f"<p>{_search_line(s)}</p>{search_chart(s)}</div>"
            for s in listed
        )
        section = f"<h2>Searches</h2><div class='charts'>{charts}</div><h2>Runs</h2>"
    note = f"<p class='muted'>searches not shown: {escape(unavailable)}</p>" if unavailable else ""
    return f"<h1>Runs</h1>{filters}{note}{section}{table}"


def search_page(s: dict[str, Any]) -> str:
    objective, budget, best = s["objective"], s["budget"], s["best"]
    dataset = f"{s['dataset'].get('name')}@{s['dataset'].get('version')}"
    timeout = budget["timeout_seconds"]
    facts = _facts(
        [
            ("model", model_link(s["model"])),
            ("dataset", escape(dataset)),
            ("family", escape(s["family"])),
            ("sampler", escape(s["sampler"])),
            ("pruner", escape(s["pruner"])),
            ("objective", escape(f"{objective['metric']} ({objective['direction']})")),
            (
                "budget",
                escape(
                    f"{budget['trials']} trials, {budget['parallel']} at once"
                    + (f", {timeout:g} s" if timeout else "")
                ),
            ),
            ("pipeline", escape(s["pipeline"] or "")),
            ("requested at", escape(s["requested_at"][:19])),
            ("state", "finished" if s["finished"] else "running"),
            (
                "best",
                f"{_num(best['value'])}: trial {best['trial']} ({run_link(best['run_id'])}) "
                f"{_params(best['params'])}"
                if best
                else None,
            ),
        ]
    )
    rows = "".join(
        f"<tr data-trial='{t['number']}'><td>{t['number']}</td><td>{run_link(t['run_id'])}</td>"
        f"<td>{_trial_state(t)}</td><td>{_params(t['params'])}</td>"
        f"<td>{_num(_last_value(t))}</td><td>{_num(t['epochs'] or len(t['intermediate']))}</td>"
        "</tr>"
        for t in s["trials"]
    )
    table = (
        "<table class='trials'><tr><th>trial</th><th>run</th><th>state</th>"
        f"<th>hyperparameters</th><th>{escape(objective['metric'])}</th><th>epochs</th></tr>"
        + (rows or "<tr><td colspan='6'>no trial requested yet</td></tr>")
        + "</table>"
    )
    return (
        f"<h1>Search <code>{escape(s['search_id'])}</code></h1>{facts}"
        f"<h2>Objective by trial</h2><div class='charts'>{search_chart(s)}</div>"
        f"<h2>Trials</h2>{table}"
    )


def _facts(pairs: Sequence[tuple[str, str | None]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs if v)
    return f"<table class='facts'>{rows}</table>"


def run_page(d: RunDetail, curves: Sequence[str]) -> str:
    model = model_link(d.model)
    lineage = None
    if d.version:
        model += f" @ <code>{escape(d.version)}</code>"
        lineage = (
            f"<a href='/ui/lineage/{_q(d.model)}?{urlencode({'version': d.version})}'>"
            "lineage of this version</a>"
        )
    artifact = None
    if d.artifact:
        artifact = (
            f"<code>{escape(str(d.artifact.get('uri')))}</code><br><code>"
            + escape(str(d.artifact.get("sha256")))
            + "</code>"
        )
    facts = _facts(
        [
            ("status", _status(d.status)),
            ("model", model),
            ("lineage", lineage),
            ("family", escape(d.family or "")),
            ("dataset", escape(d.dataset or "")),
            ("hyperparameters", _params(d.hyperparameters)),
            ("seed", _num(d.seed)),
            ("requested by", escape(d.requested_by or "")),
            ("pipeline", escape(d.pipeline or "")),
            ("sweep", escape(d.sweep_id or "")),
            ("requested at", escape(d.requested_at or "")),
            ("finished at", escape(d.finished_at or "")),
            ("epochs", f"{_num(d.epochs)}/{_num(d.max_epochs)}"),
            ("duration", f"{d.duration_seconds:.1f} s" if d.duration_seconds else None),
            ("worker", escape(d.worker or "")),
            ("artifact", artifact),
            ("code", escape(d.code_version or "")),
            ("failure", escape(d.failure or "")),
        ]
    )
    charts = "".join(
        line_chart(
            name,
            [Series(d.run_id, d.run_id[:12], _points(d, name))],
        )
        for name in curves
    )
    final = ""
    if d.final_metrics:
        splits = sorted(d.final_metrics)
        names = sorted({n for s in splits for n in d.final_metrics[s]})
        head = "".join(f"<th>{escape(s)}</th>" for s in splits)
        body = "".join(
            f"<tr><td>{escape(n)}</td>"
            + "".join(f"<td>{_num(d.final_metrics[s].get(n))}</td>" for s in splits)
            + "</tr>"
            for n in names
        )
        final = f"<h2>Final metrics</h2><table><tr><th>metric</th>{head}</tr>{body}</table>"
    confusion = ""
    if d.confusion_matrix:
        labels = d.labels or [str(i) for i in range(len(d.confusion_matrix))]
        head = "".join(f"<th>{escape(x)}</th>" for x in labels)
        body = "".join(
            f"<tr><th>{escape(label)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
            for label, row in zip(labels, d.confusion_matrix, strict=False)
        )
        confusion = (
            "<h2>Confusion matrix (test)</h2><table class='confusion'><tr>"
            f"<th>true \\ predicted</th>{head}</tr>{body}</table>"
        )
    decisions = ""
    if d.decisions:
        decisions = "<h2>Decisions on its version</h2><table><tr><th>decision</th><th>by</th>" + (
            "<th>policy</th><th>reason</th><th>time</th></tr>"
        )
        decisions += "".join(
            f"<tr><td>{escape(x.kind)}{' (rollback)' if x.rollback else ''}</td>"
            f"<td>{escape(x.actor)}</td><td>{escape(x.policy or '-')}</td>"
            f"<td>{escape(x.reason)}</td><td class='muted'>{escape((x.time or '')[:19])}</td></tr>"
            for x in d.decisions
        )
        decisions += "</table>"
    return (
        f"<h1>Run <code>{escape(d.run_id)}</code></h1>{facts}"
        f"<h2>Learning curves</h2><div class='charts'>{charts or 'no epochs reported'}</div>"
        f"{final}{confusion}{decisions}"
    )


def _points(run: RunDetail, metric: str) -> list[tuple[float, float]]:
    return [(e.epoch, e.metrics[metric]) for e in run.curves if metric in e.metrics]


def compare_page(c: Comparison) -> str:
    differing = [row.name for row in c.hyperparameters if row.differs]
    labels = []
    for r in c.runs:
        varied = " ".join(f"{k}={r.hyperparameters.get(k)}" for k in differing)
        labels.append(f"{r.run_id[:12]} {varied}".strip())
    head = "".join(
        f"<th><span class='swatch' style='background:{color(i)}'></span>{run_link(r.run_id)}"
        f"<br><span class='muted'>{escape(r.model)} · {_status(r.status)}</span></th>"
        for i, r in enumerate(c.runs)
    )

    def rows(found: Sequence[Any], metrics: bool) -> str:
        out = []
        for row in found:
            cells = []
            for i, v in enumerate(row.values):
                cls = "best" if metrics and row.best == i else ("differs" if row.differs else "")
                cells.append(f"<td class='{cls}'>{_num(v)}</td>")
            name_cls = "differs" if row.differs else "muted"
            kind = "metric" if metrics else "hyper"
            out.append(
                f"<tr class='{kind}'><th class='{name_cls}'>{escape(row.name)}</th>"
                f"{''.join(cells)}</tr>"
            )
        return "".join(out)

    table = (
        f"<table class='compare'><tr><th></th>{head}</tr>"
        f"<tr><th colspan='{len(c.runs) + 1}'>hyperparameters</th></tr>"
        f"{rows(c.hyperparameters, False)}"
        f"<tr><th colspan='{len(c.runs) + 1}'>metrics (best in green)</th></tr>"
        f"{rows(c.metrics, True)}</table>"
    )
    charts = "".join(
        line_chart(
            name,
            [
                Series(r.run_id, label, _points(r, name))
                for r, label in zip(c.runs, labels, strict=True)
            ],
        )
        for name in c.curves
    )
    policy = (
        f"<p class='muted'>policy metric: {escape(c.policy_metric)}</p>" if c.policy_metric else ""
    )
    return (
        f"<h1>Compare {len(c.runs)} runs</h1>{table}{policy}<h2>Learning curves</h2>"
        f"<div class='charts'>{charts or 'no epochs reported'}</div>"
    )


def _evidence(evidence: dict[str, Any]) -> str:
    if not evidence:
        return "-"
    text = orjson.dumps(evidence, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    return f"<details><summary>evidence</summary><pre>{escape(text)}</pre></details>"


def model_page(
    m: ModelSummary,
    decisions: list[Decision],
    runs: dict[str, str],
    headline: str | None,
    traffic: str = "",
) -> str:
    name = escape(m.model)
    lineage = f"/ui/lineage/{_q(m.model)}"
    versions = []
    for v in m.versions:
        run = run_link(v.run_id) if v.run_id else "-"
        serving = "serving" if v.serving else ""
        if v.load_failure:
            serving = f"<span class='rejected'>failed to load: {escape(v.load_failure)}</span>"
        versions.append(
            f"<tr><td><code>{escape(v.version)}</code></td><td class='status-{escape(v.status)}'>"
            f"{escape(v.status)}</td><td>{serving}</td><td>{run}</td>"
            f"<td>{_num(v.metrics.get(headline)) if headline else ''}</td>"
            f"<td class='muted'>{escape((v.trained_at or '')[:19])}</td>"
            f"<td><a href='{lineage}?{urlencode({'version': v.version})}'>lineage</a></td></tr>"
        )
    rows = []
    for d in decisions:
        kind = "rolled back to" if d.rollback else d.kind
        run_id = d.run_id or runs.get(d.version)
        rows.append(
            f"<tr><td class='muted'>{escape((d.provenance.time or '')[:19])}</td>"
            f"<td class='decision-{escape(d.kind)}'>{escape(kind)}</td>"
            f"<td><code>{escape(d.version)}</code></td><td>{escape(d.actor)}</td>"
            f"<td>{escape(d.policy or '-')}</td><td>{escape(d.reason)}</td>"
            f"<td>{run_link(run_id) if run_id else '-'}</td><td>{_evidence(d.evidence)}</td></tr>"
        )
    champion = escape(m.champion.version) if m.champion else "-"
    return (
        f"<h1>Model {name}</h1><p>champion <code>{champion}</code> · serving "
        f"<code>{escape(m.serving or '-')}</code> · "
        f"<a href='/ui/runs?{urlencode({'model': m.model})}'>runs of {name}</a> · "
        f"<a href='{lineage}'>lineage</a></p>"
        "<h2>Versions</h2><table><tr><th>version</th><th>status</th><th>serving</th><th>run</th>"
        f"<th>{escape(headline or '')}</th><th>trained</th><th></th></tr>"
        + ("".join(versions) or "<tr><td colspan='7'>no versions</td></tr>")
        + "</table><h2>Decisions</h2><table><tr><th>time</th><th>decision</th><th>version</th>"
        "<th>by</th><th>policy</th><th>reason</th><th>run</th><th>evidence</th></tr>"
        + ("".join(rows) or "<tr><td colspan='8'>no decisions</td></tr>")
        + "</table>"
        + traffic
    )


def create_router(
    lineage: Callable[[], Any], searches: Callable[[], Searches] | None = None
) -> APIRouter:
    router = APIRouter(tags=["ui"], include_in_schema=False)

    def searches_of(model: str | None) -> tuple[list[dict[str, Any]], str | None]:
        if searches is None:
            return [], None
        try:
            return searches().summaries(model), None
        except MlbusError as e:  # the log unreachable: the runs are shown without them
            return [], str(e)

    @router.get("/ui/runs", response_class=HTMLResponse)
    async def runs(
        model: str | None = None, status: str | None = None, sort: str | None = None
    ) -> HTMLResponse:
        from mlbus.consumers.lineage.runs import RunQueries

        q = RunQueries(lineage())
        chosen = status if status in STATUSES else None
        every, found = await run_in_threadpool(
            lambda: (q.list(), q.list(model or None, chosen, sort=sort or None))
        )
        listed, unavailable = await run_in_threadpool(lambda: searches_of(model or None))
        body = runs_page(found, every, model or None, chosen, sort or None, listed, unavailable)
        return page("runs", body)

    @router.get("/ui/searches/{search_id}", response_class=HTMLResponse)
    async def search(search_id: str) -> HTMLResponse:
        from mlbus.consumers.tuning.api import UnknownSearch

        if searches is None:
            raise UnknownSearch(f"no search {search_id!r}: searches are not read here")
        found = await run_in_threadpool(lambda: searches().summary(search_id))
        return page(f"search {search_id[:12]}", search_page(found))

    # Declared before `/ui/runs/{run_id}`, which would otherwise take "compare" for an id.
    @router.get("/ui/runs/compare", response_class=HTMLResponse)
    async def compare(ids: list[str] = Query(default=[])) -> HTMLResponse:  # noqa: B008 - FastAPI's way
        from mlbus.consumers.lineage.runs import RunQueries

        refs = [part for item in ids for part in item.split(",") if part.strip()]
        if not refs:
            return page("compare runs", "<h1>Compare runs</h1><p>Select runs on the "
                        "<a href='/ui/runs'>runs page</a>.</p>")  # fmt: skip
        q = RunQueries(lineage())
        comparison = await run_in_threadpool(lambda: q.compare(refs))
        return page("compare runs", compare_page(comparison))

    @router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
    async def run(run_id: str) -> HTMLResponse:
        from mlbus.consumers.lineage.runs import RunQueries, curve_names

        q = RunQueries(lineage())
        detail = await run_in_threadpool(lambda: q.show(run_id))
        every = sorted({n for e in detail.curves for n in e.metrics})
        names = curve_names([detail], None)
        names += [n for n in every if n not in names]
        return page(f"run {detail.run_id[:12]}", run_page(detail, names))

    @router.get("/ui/models/{model}", response_class=HTMLResponse)
    async def model(model: str) -> HTMLResponse:
        from mlbus.cli.ui_traffic import traffic_section
        from mlbus.consumers.lineage.queries import LineageQueries
        from mlbus.consumers.lineage.rollouts import RolloutQueries
        from mlbus.consumers.lineage.store import NotInLineage

        store = lineage()
        q, r = LineageQueries(store), RolloutQueries(store)
        models, history, split, rollouts = await run_in_threadpool(
            lambda: (q.models(), q.history(model), r.split(model), r.rollouts(model))
        )
        found = next((m for m in models if m.model == model), None)
        if found is None:
            raise NotInLineage(f"model {model!r} is not known")
        metrics = [n for v in found.versions for n in v.metrics]
        headline = next((n for n in metrics if n.startswith("test.")), None)
        by_version = {v.version: v.run_id for v in found.versions if v.run_id}
        traffic = traffic_section(split, rollouts)
        return page(f"model {model}", model_page(found, history, by_version, headline, traffic))

    return router

"""Lineage questions asked of the projection: upstream of a model version, downstream of a
dataset version, why a version was promoted or rejected, which version served at a time (as
the replicas reported on deployment.updated: deployed.py) —
each optionally *as known at* a time T (only events whose time is <= T count) — and the
listings the control plane shows (every model with its versions and champion, the newest
events), read from the store instead of replaying the log per request.

Answers are the plain dataclasses of entities.py (JSON via `dataclasses.asdict`), never
ORM rows. Links are joins on natural keys (run id, model@version, dataset@version), so a
piece that arrived late is linked as soon as it is there, and a dataset nobody announced
shows as unknown (`known=False`, "unknown upstream") instead of being invented.
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.deployed import Deployed, fold
from mlbus.consumers.lineage.entities import (
    Champion,
    DatasetNode,
    DatasetUse,
    Decision,
    Deployment,
    Downstream,
    Epoch,
    ModelSummary,
    ModelUse,
    ModelVersion,
    Provenance,
    RecentEvent,
    Run,
    Upstream,
    Why,
)
from mlbus.consumers.lineage.store import InvalidTime, LineageStore, NotInLineage, iso, micros

MAX_DEPTH = 20  # dataset ancestry deeper than this is cut (and says so)
PAIRS_PER_SELECT = 400  # far below SQLite's and PostgreSQL's limits on bound values


def _prov(row: Any) -> Provenance:
    return Provenance(row.event_id, row.topic, row.partition, row.offset, iso(row.time))


def _json(value: Any) -> Any:
    if isinstance(value, str):
        return orjson.loads(value)
    return value


def parse_time(text: str | None) -> datetime | None:
    """An --as-of argument: ISO 8601 (a date, or a time; naive times are UTC)."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidTime(f"{text!r} is not an ISO 8601 time (e.g. 2026-03-01T14:00:00Z)") from None


class LineageQueries:
    """Questions about one store. Every method takes `as_of` (None = everything known)."""

    def __init__(self, store: LineageStore) -> None:
        self.store = store

    # -- which version serves ------------------------------------------------------------------

    def serving(self, model: str, as_of: datetime | None = None) -> str | None:
        """The version of `model` a replica served at `as_of` (the newest one loaded, as
        deployment.updated reported it), or None. A promoted version that no replica loaded
        (yet, or ever: it failed) is not serving."""
        with self.store.reading() as conn:
            return _deployed(_Sql(conn, self.store, _cut(as_of)), model).serving

    def champion(self, model: str, as_of: datetime | None = None) -> str | None:
        """The version of `model` last promoted at `as_of` (a decision: serving once a
        replica loads it), or None."""
        with self.store.reading() as conn:
            return _champion(_Sql(conn, self.store, _cut(as_of)), model)

    def replicas(self, model: str, as_of: datetime | None = None) -> dict[str, str]:
        """replica → the version of `model` it served at `as_of`."""
        with self.store.reading() as conn:
            return dict(_deployed(_Sql(conn, self.store, _cut(as_of)), model).replicas)

    def history(self, model: str, as_of: datetime | None = None) -> list[Decision]:
        """Every promotion and rejection of `model` (rollbacks included), oldest first."""
        d = t.decisions
        with self.store.reading() as conn:
            rows = conn.execute(
                _known(sa.select(d).where(d.c.model == model), d, _cut(as_of)).order_by(
                    d.c.time, d.c.offset, d.c.event_id
                )
            ).all()
        return [_decision(r) for r in rows]

    # -- listings ------------------------------------------------------------------------------

    def models(self, as_of: datetime | None = None) -> list[ModelSummary]:
        """Every model (trained, promoted or rejected), by name, with its versions (trained
        or promoted), its champion (the newest promotion) and what its replicas serve."""
        cut = _cut(as_of)
        m, d, u = t.model_versions, t.decisions, t.deployments
        with self.store.reading("listing models") as conn:
            run = sa.select(
                m.c.model,
                m.c.version,
                m.c.run_id,
                m.c.time,
                m.c.dataset_name,
                m.c.dataset_version,
                m.c.metrics,
            )
            newest_first = (m.c.time.desc(), m.c.event_id.desc())
            trained = conn.execute(_known(run, m, cut).order_by(*newest_first)).all()
            decided = conn.execute(
                _known(sa.select(d), d, cut).order_by(d.c.time, d.c.offset, d.c.event_id)
            ).all()
            deployed = fold(
                conn.execute(
                    _known(
                        sa.select(
                            u.c.model, u.c.version, u.c.replica, u.c.status, u.c.error, u.c.time
                        ),
                        u,
                        cut,
                    ).order_by(u.c.time, u.c.offset, u.c.event_id)
                ).all()
            )
        runs: dict[str, dict[str, Any]] = {}
        for row in trained:  # newest first: the earliest announcement of a version wins
            runs.setdefault(row.model, {})[row.version] = row
        promotions: dict[str, list[Any]] = {}
        rejected: dict[str, dict[str, str]] = {}
        for row in decided:  # oldest first: the newest decision wins
            if row.kind == "promoted":
                promotions.setdefault(row.model, []).append(row)
            else:
                rejected.setdefault(row.model, {})[row.version] = row.reason
        names = sorted(set(runs) | set(promotions) | set(rejected) | set(deployed))
        return [
            _summary(
                name,
                runs.get(name, {}),
                promotions.get(name, []),
                rejected.get(name, {}),
                deployed.get(name, Deployed()),
            )
            for name in names
        ]

    def recent(self, types: Iterable[str], limit: int) -> list[RecentEvent]:
        """The newest `limit` events of the given types, newest first (as the projector
        read and checked them)."""
        e = t.events
        query = (
            sa.select(e.c.time, e.c.type, e.c.id, e.c.subject, e.c.key)
            .where(e.c.type.in_(list(types)))
            .order_by(e.c.time.desc(), e.c.id)
            .limit(limit)
        )
        with self.store.reading("reading recent events") as conn:
            rows = conn.execute(query).all()
        return [RecentEvent(iso(r.time), r.type, r.id, r.subject or r.key) for r in rows]

    # -- what users type ----------------------------------------------------------------------

    def model_versions(self, model: str) -> list[str]:
        """Every version of `model` the store knows (trained or decided on), sorted: what a
        version prefix typed by a user is resolved against."""
        m, d = t.model_versions, t.decisions
        query = sa.union(
            sa.select(m.c.version).where(m.c.model == model),
            sa.select(d.c.version).where(d.c.model == model),
        )
        with self.store.reading("listing model versions") as conn:
            return sorted(conn.execute(query).scalars())

    def dataset_versions(self, name: str) -> list[str]:
        """Every version of dataset `name` the store knows (announced, or used by a run)."""
        with self.store.reading("listing dataset versions") as conn:
            return _versions(conn, name, None)

    # -- upstream ------------------------------------------------------------------------------

    def upstream(
        self, model: str, version: str | None = None, as_of: datetime | None = None
    ) -> Upstream:
        """Where `model@version` came from: its run, the dataset versions it was trained on
        with their ancestry, hyperparameters, code version, who asked; its decisions and
        deployments. No version: the one serving (at `as_of`), else the champion (promoted,
        not loaded), else the newest trained."""
        cut = _cut(as_of)
        with self.store.reading("querying upstream lineage") as conn:
            sql = _Sql(conn, self.store, cut)
            deployed = _deployed(sql, model)
            if version is None:
                version = deployed.serving or _champion(sql, model) or _newest_version(sql, model)
                if version is None:
                    raise NotInLineage(f"no version of model {model!r} is known" + _at(as_of))
            this = {"model": model, "version": version}
            produced = _one(sql.select(t.model_versions, this, FIRST, limit=1))
            decisions = [_decision(r) for r in sql.select(t.decisions, this, '"time", "offset"')]
            run_id = produced.run_id if produced is not None else None
            if run_id is None:
                run_id = next((x.run_id for x in decisions if x.run_id), None)
            run, dataset_ref = _run(sql, run_id, produced)
            deployments = _deployments(sql, model, version)
            if produced is None and not decisions and not deployments and run.status == "unknown":
                raise NotInLineage(f"model version {model}@{version} is not known" + _at(as_of))
            datasets = []
            if dataset_ref is not None:
                datasets.append(_dataset(sql, dataset_ref[0], dataset_ref[1]))
            replicas = deployed.serves(version)
        return Upstream(
            model=model,
            version=version,
            as_of=iso(cut) if cut is not None else None,
            serving=bool(replicas),
            run=run,
            datasets=datasets,
            decisions=decisions,
            deployments=deployments,
            provenance=_prov(produced) if produced else None,
            replicas=replicas,
            load_failure=deployed.failure(version),
        )

    # -- downstream ----------------------------------------------------------------------------

    def downstream(
        self, dataset: str, version: str | None = None, as_of: datetime | None = None
    ) -> Downstream:
        """Every run and model version that used `dataset` (one version, or all), the
        datasets derived from it, and where those models serve now (or at `as_of`)."""
        cut = _cut(as_of)
        with self.store.reading("querying downstream lineage") as conn:
            versions = [version] if version is not None else _versions(conn, dataset, cut)
            if not versions:
                raise NotInLineage(f"no version of dataset {dataset!r} is known" + _at(as_of))
            out = [_uses(conn, _Sql(conn, self.store, cut), dataset, v) for v in versions]
        return Downstream(dataset, iso(cut) if cut is not None else None, out)

    # -- why -----------------------------------------------------------------------------------

    def why(self, model: str, version: str, as_of: datetime | None = None) -> Why:
        """The promotion and rejection decisions of `model@version`, with policy and
        evidence, oldest first."""
        cut = _cut(as_of)
        d, m = t.decisions, t.model_versions
        with self.store.reading() as conn:
            rows = conn.execute(
                _known(
                    sa.select(d).where(d.c.model == model, d.c.version == version), d, cut
                ).order_by(d.c.time, d.c.offset)
            ).all()
            known = (
                conn.execute(
                    _known(
                        sa.select(m.c.event_id).where(m.c.model == model, m.c.version == version),
                        m,
                        cut,
                    ).limit(1)
                ).first()
                is not None
            )
        if not rows and not known:
            raise NotInLineage(f"model version {model}@{version} is not known" + _at(as_of))
        return Why(model, version, known, [_decision(r) for r in rows])


# -- building blocks ----------------------------------------------------------------------------


def _cut(as_of: datetime | None) -> int | None:
    return micros(as_of) if as_of is not None else None


def _at(as_of: datetime | None) -> str:
    return f" as of {as_of.isoformat()}" if as_of is not None else ""


def _known(query: Any, table: sa.Table, cut: int | None) -> Any:
    return query if cut is None else query.where(table.c.time <= cut)


#: ORDER BY of "the earliest row": when an entity was announced twice (a re-publish under a
#: new id), the first announcement is the one that counts
FIRST = '"time", "event_id"'


class _Sql:
    """SELECTs of the upstream path as driver SQL, each `time <= cut` when a cut is given.

    Building a SQLAlchemy statement, its cache key and its result metadata costs more than
    SQLite's answer (in a profile of an answer with a wide dataset ancestry, most of the
    time was SQLAlchemy's statement construction, coercion, caching and row processing, not
    the database's), and an upstream answer runs ten statements and more. So the DBAPI
    cursor of the connection is used directly; its errors are raised as SQLAlchemy's, which
    the store translates. Values are always bound, never formatted in.
    """

    def __init__(self, conn: Connection, store: LineageStore, cut: int | None) -> None:
        self.conn = conn
        self.cut = cut
        self.mark = "%s" if store.backend == "postgresql" else "?"
        self.schema = store.schema

    def select(
        self,
        table: sa.Table,
        where: dict[str, Any] | list[dict[str, Any]],
        order: str,
        *,
        limit: int | None = None,
        columns: str = "*",
    ) -> list[Any]:
        """Rows of `table` matching `where` (one dict: all its columns equal; a list of
        dicts: any of them), ordered by `order` (SQL, column names quoted)."""
        params: list[Any] = []

        def conjunction(equal: dict[str, Any]) -> str:
            params.extend(equal.values())
            return " AND ".join(f'"{c}" = {self.mark}' for c in equal)

        if isinstance(where, dict):
            clause = conjunction(where)
        else:  # OR of pairs, not a row-value IN: SQLite scans the table for the latter
            clause = " OR ".join(f"({conjunction(equal)})" for equal in where)
        if self.cut is not None:
            clause = f'({clause}) AND "time" <= {self.mark}'
            params.append(self.cut)
        name = f'"{self.schema}"."{table.name}"' if self.schema else f'"{table.name}"'
        sql = f"SELECT {columns} FROM {name} WHERE {clause} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        dbapi = self.conn.dialect.loaded_dbapi
        cursor = self.conn.connection.cursor()
        try:
            cursor.execute(sql, tuple(params))
            row = _row_type(tuple(d[0] for d in cursor.description))
            return [row._make(r) for r in cursor.fetchall()]
        except dbapi.Error as e:  # as SQLAlchemy would raise it: the store translates those
            raise DBAPIError.instance(sql, params, e, dbapi.Error) from e
        finally:
            cursor.close()


@lru_cache(maxsize=256)
def _row_type(columns: tuple[str, ...]) -> Any:
    """Rows with attribute access by column name, one type per column list."""
    return namedtuple("Row", columns)


def _one(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def _deployed(sql: _Sql, model: str) -> Deployed:
    rows = sql.select(
        t.deployments,
        {"model": model},
        '"time", "offset", "event_id"',
        columns='"model", "version", "replica", "status", "error", "time"',
    )
    return fold(rows).get(model, Deployed())


def _champion(sql: _Sql, model: str) -> str | None:
    """The newest promotion's version (a decision: not necessarily serving)."""
    row = _one(
        sql.select(
            t.decisions,
            {"model": model, "kind": "promoted"},
            '"time" DESC, "offset" DESC, "event_id" DESC',
            limit=1,
            columns='"version"',
        )
    )
    return row.version if row is not None else None


def _newest_version(sql: _Sql, model: str) -> str | None:
    row = _one(
        sql.select(
            t.model_versions,
            {"model": model},
            '"time" DESC, "event_id" DESC',
            limit=1,
            columns='"version"',
        )
    )
    return row.version if row is not None else None


def _summary(
    name: str,
    runs: dict[str, Any],
    promotions: list[Any],
    rejected: dict[str, str],
    deployed: Deployed,
) -> ModelSummary:
    last = promotions[-1] if promotions else None
    champion = None
    if last is not None:
        policy = None
        if last.policy_name:
            policy = {"name": last.policy_name, "version": last.policy_version}
        since, rollback = iso(last.time), bool(last.rollback)
        champion = Champion(
            last.version, since, last.actor, last.reason, rollback, policy, last.event_id
        )
    promoted = {p.version for p in promotions}
    # A rollback moves away from a version for good: it is never a rollback target again.
    rolled_back = {p.previous_version for p in promotions if p.rollback and p.previous_version}
    versions = []
    for version in sorted(set(runs) | promoted | set(deployed.replicas.values())):
        run = runs.get(version)
        replicas = deployed.serves(version)
        failure = deployed.failure(version)
        status = (
            "champion"
            if champion and version == champion.version
            else "rolled back"
            if version in rolled_back
            else "promoted before"
            if version in promoted
            else "rejected"
            if version in rejected
            else "candidate"
        )
        reason = rejected.get(version)
        if run is None:  # promoted; its training.completed is not (yet) known
            versions.append(
                ModelVersion(
                    version, status, None, None, None, {}, reason, bool(replicas), replicas, failure
                )
            )
            continue
        dataset = {"name": run.dataset_name, "version": run.dataset_version}
        metrics = _flat(_json(run.metrics))
        versions.append(
            ModelVersion(
                version,
                status,
                run.run_id,
                iso(run.time),
                dataset,
                metrics,
                reason,
                bool(replicas),
                replicas,
                failure,
            )
        )
    return ModelSummary(name, champion, versions, deployed.serving, dict(deployed.replicas))


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """{"test": {"accuracy": x}} as {"test.accuracy": x}; unmeasured ones (an empty split:
    NaN, which JSON carries as null) left out."""
    return {
        f"{split}.{name}": value
        for split, values in metrics.items()
        if isinstance(values, dict)
        for name, value in values.items()
        if value is not None and not math.isnan(value)
    }


def _decision(r: Any) -> Decision:
    policy = f"{r.policy_name} v{r.policy_version}" if r.policy_name else None
    return Decision(
        kind=r.kind,
        model=r.model,
        version=r.version,
        reason=r.reason,
        actor=r.actor,
        policy=policy,
        evidence=_json(r.evidence),
        rollback=bool(r.rollback),
        previous_version=r.previous_version,
        champion_version=r.champion_version,
        run_id=r.run_id,
        provenance=_prov(r),
    )


def _run(sql: _Sql, run_id: str | None, produced: Any) -> tuple[Run, tuple[str, str] | None]:
    """The run (from whichever of its events are known) and the dataset it trained on."""
    if run_id is None and produced is None:
        return Run(run_id=None, status="unknown"), None
    this = {"run_id": run_id}
    started = _one(sql.select(t.training_runs, this, FIRST, limit=1)) if run_id else None
    failed = _one(sql.select(t.run_failures, this, FIRST, limit=1)) if run_id else None
    request_id = (
        (produced.request_id if produced is not None else None)
        or (started.request_id if started is not None else None)
        or (failed.request_id if failed is not None else None)
    )
    request = (
        _one(sql.select(t.training_requests, {"event_id": request_id}, '"event_id"'))
        if request_id
        else None
    )
    progress = sql.select(t.run_progress, this, '"epoch", "time", "event_id"') if run_id else []
    epochs, seen = [], set()
    for p in progress:
        if p.epoch not in seen:
            seen.add(p.epoch)
            epochs.append(Epoch(p.epoch, p.max_epochs, _json(p.metrics), p.event_id))
    events = [_prov(x) for x in (request, started, *progress, failed, produced) if x is not None]
    events.sort(key=lambda e: (e.time or "", e.event_id))
    if produced is not None:
        status = "completed"
    elif failed is not None:
        status = "failed"
    elif started is not None:
        status = "started"
    elif request is not None:
        status = "requested"
    else:
        status = "unknown"
    dataset = None
    for source in (produced, started, request):
        if source is not None:
            dataset = (source.dataset_name, source.dataset_version)
            break
    # what the run reports it used; else what was asked for
    hyper = _json(produced.hyperparameters) if produced is not None else {}
    if not hyper and request is not None:
        hyper = _json(request.hyperparameters)
    run = Run(
        run_id=run_id,
        status=status,
        request_id=request_id,
        family=produced.family if produced is not None else (request.family if request else None),
        hyperparameters=hyper,
        seed=produced.seed if produced is not None else (request.seed if request else None),
        epochs=produced.epochs if produced is not None else None,
        code_version=produced.code_version if produced is not None else None,
        git_commit=produced.git_commit if produced is not None else None,
        requested_by=request.requested_by if request is not None else None,
        pipeline=request.pipeline if request is not None else None,
        correlationid=request.correlationid if request is not None else None,
        worker=started.worker if started is not None else None,
        attempt=started.attempt if started is not None else None,
        metrics=_json(produced.metrics) if produced is not None else {},
        artifact_uri=produced.artifact_uri if produced is not None else None,
        artifact_sha256=produced.artifact_sha256 if produced is not None else None,
        duration_seconds=produced.duration_seconds if produced is not None else None,
        failure=failed.reason if failed is not None else None,
        progress=epochs,
        events=events,
    )
    return run, dataset


def _dataset(sql: _Sql, name: str, version: str) -> DatasetNode:
    """The dataset version with its ancestry (parents of parents, up to MAX_DEPTH)."""
    rows = _ancestry(sql, name, version)
    # Without a cycle, a node's subtree depends only on the node and its depth (the path
    # check never fires), so a version reached by many paths is built once and shared: the
    # answer is a tree of up to a few hundred nodes over a few dozen distinct versions.
    memo: dict[tuple[Key, int], DatasetNode] | None = None if _cyclic(rows) else {}
    return _node(rows, (name, version), 0, frozenset(), memo)


Key = tuple[str, str]


def _ancestry(sql: _Sql, name: str, version: str) -> dict[Key, Any]:
    """The first announcement of every dataset version in the ancestry of `name@version`
    (None: not announced), one generation per round trip: a version with a wide ancestry
    has a hundred nodes and more, and a query per node made the slowest upstream answers."""
    found: dict[Key, Any] = {}
    wanted = {(name, version)}
    for _ in range(MAX_DEPTH + 1):  # nodes below depth MAX_DEPTH are cut, never read
        pairs = [{"name": n, "version": ver} for n, ver in sorted(wanted)]
        for chunk in range(0, len(pairs), PAIRS_PER_SELECT):
            for row in sql.select(
                t.dataset_versions, pairs[chunk : chunk + PAIRS_PER_SELECT], FIRST
            ):
                found.setdefault((row.name, row.version), row)  # the earliest counts (FIRST)
        parents = set()
        for key in wanted:
            found.setdefault(key, None)
            if found[key] is not None:
                parents.update(_parents(found[key]))
        wanted = parents - found.keys()
        if not wanted:
            break
    return found


def _parents(row: Any) -> list[Key]:
    return [(n, v) for n, v in _json(row.parents)]


def _cyclic(rows: dict[Key, Any]) -> bool:
    """Whether the parent links among `rows` have a cycle (Kahn: a cycle never drains)."""
    parents = {key: _parents(row) if row is not None else [] for key, row in rows.items()}
    children = dict.fromkeys(rows, 0)
    for keys in parents.values():
        for key in keys:
            if key in children:
                children[key] += 1
    ready = [key for key, n in children.items() if n == 0]
    drained = 0
    while ready:
        drained += 1
        for key in parents[ready.pop()]:
            if key in children:
                children[key] -= 1
                if children[key] == 0:
                    ready.append(key)
    return drained < len(rows)


def _node(
    rows: dict[Key, Any],
    key: Key,
    depth: int,
    path: frozenset[Key],
    memo: dict[tuple[Key, int], DatasetNode] | None,
) -> DatasetNode:
    if memo is not None and (key, depth) in memo:
        return memo[key, depth]
    row = rows.get(key)
    if row is None:
        return DatasetNode(name=key[0], version=key[1], known=False)
    parents: list[DatasetNode] = []
    truncated = False
    for parent in _parents(row):
        if depth >= MAX_DEPTH or parent in path:  # too deep, or a cycle someone published
            truncated = True
            continue
        parents.append(_node(rows, parent, depth + 1, path | {key}, memo))
    node = DatasetNode(
        name=key[0],
        version=key[1],
        known=True,
        uri=row.uri,
        content_hash=row.content_hash,
        num_rows=row.num_rows,
        created_by=row.created_by,
        tags=_json(row.tags),
        parents=parents,
        truncated=truncated,
        provenance=_prov(row),
    )
    if memo is not None:
        memo[key, depth] = node
    return node


def _deployments(sql: _Sql, model: str, version: str) -> list[Deployment]:
    rows = sql.select(t.deployments, {"model": model, "version": version}, '"time", "offset"')
    return [Deployment(r.replica, r.version, r.status, r.error, _prov(r)) for r in rows]


def _versions(conn: Connection, name: str, cut: int | None) -> list[str]:
    found: set[str] = set()
    for table, n, v in (
        (t.dataset_versions, "name", "version"),
        (t.training_requests, "dataset_name", "dataset_version"),
        (t.training_runs, "dataset_name", "dataset_version"),
        (t.model_versions, "dataset_name", "dataset_version"),
    ):
        query = _known(sa.select(table.c[v]).where(table.c[n] == name), table, cut).distinct()
        found.update(conn.execute(query).scalars())
    return sorted(found)


def _uses(conn: Connection, sql: _Sql, name: str, version: str) -> DatasetUse:
    cut = sql.cut
    v, e = t.dataset_versions, t.lineage_edges
    known = (
        conn.execute(
            _known(
                sa.select(v.c.event_id).where(v.c.name == name, v.c.version == version), v, cut
            ).limit(1)
        ).first()
        is not None
    )
    node = f"dataset:{name}@{version}"
    derived = sorted(
        set(
            conn.execute(
                _known(
                    sa.select(e.c.dst).where(e.c.src == node, e.c.relation == "derived_from"),
                    e,
                    cut,
                )
            ).scalars()
        )
    )
    m, r, q = t.model_versions, t.training_runs, t.training_requests
    uses: dict[str, ModelUse] = {}
    deployed_cache: dict[str, Deployed] = {}

    def deployed(model: str) -> Deployed:
        if model not in deployed_cache:
            deployed_cache[model] = _deployed(sql, model)
        return deployed_cache[model]

    for row in conn.execute(
        _known(
            sa.select(m).where(m.c.dataset_name == name, m.c.dataset_version == version), m, cut
        ).order_by(m.c.time, m.c.event_id)
    ):
        if row.run_id in uses:
            continue
        d = t.decisions
        kinds = (
            conn.execute(
                _known(
                    sa.select(d.c.kind).where(d.c.model == row.model, d.c.version == row.version),
                    d,
                    cut,
                ).order_by(d.c.time, d.c.offset)
            )
            .scalars()
            .all()
        )
        uses[row.run_id] = ModelUse(
            model=row.model,
            version=row.version,
            run_id=row.run_id,
            status="completed",
            serving_now=bool(deployed(row.model).serves(row.version)),
            replicas=deployed(row.model).serves(row.version),
            decisions=list(kinds),
            provenance=_prov(row),
        )
    failed = {
        x.run_id
        for x in conn.execute(
            _known(sa.select(t.run_failures.c.run_id), t.run_failures, cut).where(
                t.run_failures.c.run_id.in_(
                    sa.select(r.c.run_id).where(
                        r.c.dataset_name == name, r.c.dataset_version == version
                    )
                )
            )
        )
    }
    for row in conn.execute(
        _known(
            sa.select(r).where(r.c.dataset_name == name, r.c.dataset_version == version), r, cut
        ).order_by(r.c.time, r.c.event_id)
    ):
        if row.run_id not in uses:
            status = "failed" if row.run_id in failed else "started"
            uses[row.run_id] = ModelUse(
                row.model, None, row.run_id, status, False, [], [], _prov(row)
            )
    started_requests = {u.provenance.event_id for u in uses.values()}
    for row in conn.execute(
        _known(
            sa.select(q).where(q.c.dataset_name == name, q.c.dataset_version == version), q, cut
        ).order_by(q.c.time, q.c.event_id)
    ):
        taken = conn.execute(
            _known(sa.select(r.c.run_id).where(r.c.request_id == row.event_id), r, cut).limit(1)
        ).first()
        taken = (
            taken
            or conn.execute(
                _known(sa.select(m.c.run_id).where(m.c.request_id == row.event_id), m, cut).limit(1)
            ).first()
        )
        if taken is None and row.event_id not in started_requests:
            uses[f"request:{row.event_id}"] = ModelUse(
                row.model, None, None, "requested", False, [], [], _prov(row)
            )
    ordered = sorted(uses.values(), key=lambda u: (u.provenance.time or "", u.provenance.event_id))
    return DatasetUse(name, version, known, derived, ordered)

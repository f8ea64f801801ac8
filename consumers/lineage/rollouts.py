"""Rollouts as the lineage store knows them (the `rollouts` table, fed by `model.traffic`):
every change of a model's split with its weights, actor, reason and analysis; the split in
force at a time; and which part a version played when it answered a request at a time
(the stable version, a canary's or an A/B's candidate, a shadow). Read-only queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.entities import Decision, Provenance
from mlbus.consumers.lineage.queries import LineageQueries, _at, _cut, _json, _known, _prov
from mlbus.consumers.lineage.store import LineageStore, NotInLineage, iso

#: The per-version figures of an analysis kept in a change's summary (the window ids stay
#: in `analysis`).
_FIGURES = ("requests", "served", "errors", "client_errors", "error_ratio", "latency_p99",
            "labelled", "accuracy", "agreement", "shadowed")  # fmt: skip


@dataclass(frozen=True)
class RolloutChange:
    """One `model.traffic` event: the split it put in force and why."""

    rollout_id: str
    model: str
    strategy: str  # canary, shadow, ab
    status: str  # started, advanced, completed, aborted
    stable: str
    candidate: str
    weights: dict[str, int]
    shadow: bool
    step: int
    steps: list[int]
    reason: str
    actor: str
    policy: str | None
    run_id: str | None
    cause: str | None
    criteria: dict[str, Any]
    analysis: dict[str, Any]
    provenance: Provenance

    @property
    def active(self) -> bool:
        return self.status in ("started", "advanced")

    def weight_of(self, version: str) -> int:
        return self.weights.get(version, 0)

    def summary(self) -> dict[str, Any]:
        """The analysis in brief: the verdict, each version's figures, the checks' reasons."""
        versions = self.analysis.get("versions")
        out: dict[str, Any] = {}
        if "verdict" in self.analysis:
            out["verdict"] = self.analysis["verdict"]
        if isinstance(versions, dict):
            out["versions"] = {
                v: {k: f.get(k) for k in _FIGURES if k in f}
                for v, f in versions.items()
                if isinstance(f, dict)
            }
        checks = self.analysis.get("checks")
        if isinstance(checks, list):
            out["checks"] = [
                {k: c.get(k) for k in ("metric", "passed", "reason")}
                for c in checks
                if isinstance(c, dict)
            ]
        return out


@dataclass(frozen=True)
class Rollout:
    """One rollout (its changes share a rollout id), oldest change first."""

    rollout_id: str
    model: str
    strategy: str
    stable: str
    candidate: str
    status: str  # of its newest change
    started: str | None
    ended: str | None
    changes: list[RolloutChange]


@dataclass(frozen=True)
class Split:
    """How a model's requests were split at a time: `weights` by version (percent), the
    change of a rollout in progress that set them (None: the champion answered all)."""

    model: str
    as_of: str | None
    champion: str | None
    weights: dict[str, int]
    shadow: str | None = None
    """a shadow candidate answering a copy of every request"""
    change: RolloutChange | None = None


@dataclass(frozen=True)
class Served:
    """The part `version` played for a request answered at `at`, and who decided it."""

    model: str
    version: str
    at: str | None
    role: str
    """stable (the champion, with or without a rollout), candidate (of a canary or an A/B
    rollout's weights), shadow (a copy, never returned), or unknown (neither the champion nor
    a candidate at that time)"""
    split: Split
    rollout: Rollout | None = None
    """the rollout in force at `at`, up to the change in force then"""
    promotion: Decision | None = None
    """the newest promotion of `version` at `at` (None for a candidate never promoted yet)"""
    events: list[Provenance] = field(default_factory=list)
    """the events this answer rests on: the rollout's changes up to `at` and the promotion"""


class RolloutQueries:
    """Rollout questions about one store. Every method takes `as_of` (None: all known)."""

    def __init__(self, store: LineageStore) -> None:
        self.store = store

    def changes(self, model: str, as_of: datetime | None = None) -> list[RolloutChange]:
        """Every change of `model`'s split, oldest first."""
        r = t.rollouts
        with self.store.reading("reading rollouts") as conn:
            rows = conn.execute(
                _known(sa.select(r).where(r.c.model == model), r, _cut(as_of)).order_by(
                    r.c.time, r.c.offset, r.c.event_id
                )
            ).all()
        return [_change(row) for row in rows]

    def rollouts(self, model: str, as_of: datetime | None = None) -> list[Rollout]:
        """`model`'s rollouts, oldest first, each with its changes."""
        by_id: dict[str, list[RolloutChange]] = {}
        for change in self.changes(model, as_of):
            by_id.setdefault(change.rollout_id, []).append(change)
        return [_rollout(changes) for changes in by_id.values()]

    def split(self, model: str, as_of: datetime | None = None) -> Split:
        """The split in force at `as_of`: the newest change's weights while its rollout is in
        progress, else all to the champion."""
        queries = LineageQueries(self.store)
        promoted = _promoted(queries.history(model, as_of))
        changes = self.changes(model, as_of)
        if promoted is None and not changes and not queries.model_versions(model):
            raise NotInLineage(f"model {model!r} is not known" + _at(as_of))
        return _split(model, as_of, promoted, changes[-1] if changes else None)

    def served(self, model: str, version: str, at: datetime, *, shadow: bool = False) -> Served:
        """What `version` was when it answered a request of `model` at `at` (a shadow's
        answer when `shadow`), with the rollout and the promotion behind it."""
        queries = LineageQueries(self.store)
        history = queries.history(model, at)
        promoted = _promoted(history)
        changes = self.changes(model, at)
        newest = changes[-1] if changes else None
        split = _split(model, at, promoted, newest)
        rollout = None
        if newest is not None and newest.active:
            rollout = _rollout([c for c in changes if c.rollout_id == newest.rollout_id])
        if shadow:
            role = "shadow"
        elif rollout is not None and version == rollout.candidate:
            role = "candidate"
        elif version in split.weights or (rollout is not None and version == rollout.stable):
            role = "stable"
        else:
            role = "unknown"
        promotion = next(
            (d for d in reversed(history) if d.kind == "promoted" and d.version == version), None
        )
        events = [c.provenance for c in rollout.changes] if rollout else []
        if promotion is not None:
            events.append(promotion.provenance)
        return Served(model, version, split.as_of, role, split, rollout, promotion, events)


def _split(
    model: str, as_of: datetime | None, promoted: Decision | None, newest: RolloutChange | None
) -> Split:
    champion = promoted.version if promoted is not None else None
    when = iso(_cut(as_of)) if as_of is not None else None
    if (
        newest is not None
        and newest.status == "completed"
        and (promoted is None or (promoted.provenance.time or "") < (newest.provenance.time or ""))
    ):  # the candidate took all traffic; the promotion of it that follows is not known yet
        return Split(model, when, champion, {newest.candidate: 100})
    if newest is None or not newest.active:
        return Split(model, when, champion, {champion: 100} if champion else {})
    weights = {v: w for v, w in newest.weights.items() if w}
    return Split(
        model,
        when,
        champion,
        weights,
        shadow=newest.candidate if newest.shadow else None,
        change=newest,
    )


def _promoted(history: list[Decision]) -> Decision | None:
    """The newest promotion (the champion's), of a model's decisions oldest first."""
    return next((d for d in reversed(history) if d.kind == "promoted"), None)


def _rollout(changes: list[RolloutChange]) -> Rollout:
    first, last = changes[0], changes[-1]
    return Rollout(
        first.rollout_id,
        first.model,
        first.strategy,
        first.stable,
        first.candidate,
        last.status,
        first.provenance.time,
        None if last.active else last.provenance.time,
        changes,
    )


def _change(r: Any) -> RolloutChange:
    policy = f"{r.policy_name} v{r.policy_version}" if r.policy_name else None
    return RolloutChange(
        rollout_id=r.rollout_id,
        model=r.model,
        strategy=r.strategy,
        status=r.status,
        stable=r.stable,
        candidate=r.candidate,
        weights=_json(r.weights),
        shadow=bool(r.shadow),
        step=r.step,
        steps=_json(r.steps),
        reason=r.reason,
        actor=r.actor,
        policy=policy,
        run_id=r.run_id,
        cause=r.cause,
        criteria=_json(r.criteria),
        analysis=_json(r.analysis),
        provenance=_prov(r),
    )

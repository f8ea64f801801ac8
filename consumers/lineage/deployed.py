"""Which versions of a model serve, as the replicas reported it on `deployment.updated`: a
promotion is a decision, a `loaded` report is a replica serving. Folded at query time from the
`deployments` rows (append-only, so a rebuild from offset 0 answers the same), never from
`model.promoted` (docs/lineage.md, "Serving means loaded").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: What a replica reports when a version cannot load and no error was given.
NO_REASON = "failed to load (no reason reported)"


@dataclass
class Deployed:
    """One model's deployment state, from its `deployments` rows in log order."""

    replicas: dict[str, str] = field(default_factory=dict)
    """replica → the version it serves (its newest `loaded` not followed by an `unloaded`
    of that version; a `failed` load leaves what the replica served before serving)"""
    since: dict[str, int] = field(default_factory=dict)
    """replica → when it loaded the version it serves (event time, microseconds)"""
    failures: dict[str, str] = field(default_factory=dict)
    """version → the newest reason a replica gave for failing to load it"""

    @property
    def serving(self) -> str | None:
        """The version serving: among the replicas' versions, the one loaded last (replicas
        that stopped without reporting keep their last version, so the newest load wins)."""
        if not self.replicas:
            return None
        newest = max(self.replicas, key=lambda r: (self.since[r], r))
        return self.replicas[newest]

    def serves(self, version: str) -> list[str]:
        """The replicas serving `version`, sorted."""
        return sorted(r for r, v in self.replicas.items() if v == version)

    def failure(self, version: str) -> str | None:
        """Why `version` does not serve: its newest load failure, when no replica serves it."""
        if version in self.replicas.values():
            return None
        return self.failures.get(version)


def fold(rows: Iterable[Any]) -> dict[str, Deployed]:
    """model → its deployment state; `rows` are `deployments` rows (with model, version,
    replica, status, error, time) ordered by time, offset."""
    out: dict[str, Deployed] = {}
    for row in rows:
        state = out.setdefault(row.model, Deployed())
        if row.status == "loaded":
            state.replicas[row.replica] = row.version
            state.since[row.replica] = row.time
        elif row.status == "unloaded":
            if state.replicas.get(row.replica) == row.version:
                del state.replicas[row.replica]
                del state.since[row.replica]
        elif row.status == "failed":
            state.failures[row.version] = row.error or NO_REASON
    return out

"""The rollout part of a model's page (/ui/models/{model}): the split of its requests in
force (stable and candidate weights, strategy, step, a shadow) and every rollout with each
change of weights, who decided it and why, and the analysis behind it. A query of the lineage
store's `rollouts` (model.traffic), like the rest of the page."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from mlbus.consumers.lineage.rollouts import Rollout, RolloutChange, Split


def _weights(weights: dict[str, int]) -> str:
    return ", ".join(f"<code>{escape(v)}</code> {w}%" for v, w in weights.items()) or "-"


def _step(c: RolloutChange) -> str:
    return f"{c.step + 1} of {len(c.steps)} ({', '.join(f'{s}%' for s in c.steps)})"


def _analysis(c: RolloutChange) -> str:
    summary = c.summary()
    if not summary:
        return "-"
    text = orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    return f"<details><summary>analysis</summary><pre>{escape(text)}</pre></details>"


def split_section(split: Split) -> str:
    """The split in force now."""
    c = split.change
    if c is None:
        facts = f"<p class='traffic'>all requests to <code>{escape(split.champion or '-')}</code>"
        return facts + " (no rollout in progress)</p>"
    rows = [
        ("strategy", escape(c.strategy)),
        ("stable", f"<code>{escape(c.stable)}</code> {c.weight_of(c.stable)}%"),
        ("candidate", f"<code>{escape(c.candidate)}</code> {c.weight_of(c.candidate)}%"
         + (" (shadow: a copy of every request, never returned)" if c.shadow else "")),
        ("step", _step(c) if c.steps else "held (ended by hand)"),
        ("rollout", f"<code>{escape(c.rollout_id)}</code>, {escape(c.status)} by "
         f"{escape(c.actor)}: {escape(c.reason)}"),
    ]  # fmt: skip
    cells = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='facts traffic'>{cells}</table>"


def rollouts_section(rollouts: Sequence[Rollout]) -> str:
    """Every rollout, newest first, each change of weights with its reason."""
    if not rollouts:
        return "<p>no rollouts</p>"
    out = []
    for r in reversed(rollouts):
        rows = "".join(
            f"<tr><td class='muted'>{escape((c.provenance.time or '')[:19])}</td>"
            f"<td class='rollout-{escape(c.status)}'>{escape(c.status)}</td>"
            f"<td>{_weights(c.weights)}</td><td>{_step(c) if c.steps else '-'}</td>"
            f"<td>{escape(c.actor)}</td><td>{escape(c.reason)}</td><td>{_analysis(c)}</td></tr>"
            for c in r.changes
        )
        out.append(
            f"<h3>{escape(r.strategy)} of <code>{escape(r.candidate)}</code> beside "
            f"<code>{escape(r.stable)}</code>: {escape(r.status)} "
            f"<span class='muted'>{escape(r.rollout_id)}</span></h3>"
            "<table><tr><th>time</th><th>change</th><th>weights</th><th>step</th><th>by</th>"
            f"<th>reason</th><th>analysis</th></tr>{rows}</table>"
        )
    return "".join(out)


def traffic_section(split: Split, rollouts: Sequence[Rollout]) -> str:
    return f"<h2>Traffic</h2>{split_section(split)}<h2>Rollouts</h2>{rollouts_section(rollouts)}"

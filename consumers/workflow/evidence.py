"""Whether the version a rollback would go back to does better on the metric that fired, from
what the alert carries (streams/alerts.py): the firing windows' counts and the recent history
of the model's other versions. A pure function; its answer is the evidence the rollback's
`model.promoted` records, and a rollback is made only when it says `better`.

Proportions (error_rate: server errors over requests not refused; accuracy: wrong answers
over labelled feedback) are compared with a one-sided two-proportion test at the alert's
confidence, the earlier version needing the rule's minimum samples in its history. Latency
and RMSE have no such test here: the earlier version must have been within the threshold
and below what fired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import JsonValue

from mlbus.schemas.serving import ServingAlert
from mlbus.stats import worse_proportion

#: rule → (the firing windows' bad count, their sample count) as `pooled` names them.
PROPORTIONS = {"error_rate": ("errors", "n"), "accuracy": ("wrong", "labelled")}


@dataclass(frozen=True)
class Comparison:
    better: bool
    reason: str
    figures: dict[str, JsonValue] = field(default_factory=dict)

    def evidence(self) -> dict[str, JsonValue]:
        return {"better": self.better, "reason": self.reason, **self.figures}


def compare(alert: ServingAlert, target: str) -> Comparison:
    """Does `target` do better than the alert's version on the alert's metric?"""
    evidence = alert.evidence
    others = evidence.get("others")
    history = others.get(target) if isinstance(others, dict) else None
    if not isinstance(history, dict):
        return Comparison(
            False,
            f"no history of {target} on {alert.alert} in the alert: nothing shows it does better",
        )
    confidence = _number(evidence.get("confidence")) or 0.99
    min_samples = int(_number(evidence.get("min_samples")) or 1)
    pooled = evidence.get("pooled")
    pooled = pooled if isinstance(pooled, dict) else {}
    figures: dict[str, JsonValue] = {
        "metric": alert.alert,
        "current": {"version": alert.version, **pooled},
        "previous": {"version": target, **history},
        "confidence": confidence,
    }
    if alert.alert in PROPORTIONS:
        bad, size = PROPORTIONS[alert.alert]
        k1, n1 = int(_number(pooled.get(bad)) or 0), int(_number(pooled.get(size)) or 0)
        k2, n2 = int(_number(history.get("k")) or 0), int(_number(history.get("n")) or 0)
        if n2 < min_samples:
            return Comparison(
                False,
                f"{target} has {n2} samples of {alert.alert} in its history, fewer than "
                f"{min_samples}",
                figures,
            )
        z, p = worse_proportion(k1, n1, k2, n2)
        figures |= {
            "test": "one-sided two-proportion z-test: the current version's rate is higher",
            "z": round(z, 4),
            "p_value": p,
        }
        if p < 1 - confidence:
            return Comparison(
                True,
                f"{alert.version} {k1}/{n1} against {target} {k2}/{n2}: worse at "
                f"{confidence} (p = {p:.3g})",
                figures,
            )
        return Comparison(
            False,
            f"{alert.version} {k1}/{n1} against {target} {k2}/{n2}: not shown worse at "
            f"{confidence} (p = {p:.3g})",
            figures,
        )
    key = {"latency_p99": "p99_median", "rmse": "rmse"}.get(alert.alert)
    theirs = _number(history.get(key)) if key else None
    if theirs is None:
        return Comparison(False, f"no comparison known for {alert.alert}", figures)
    n2 = int(_number(history.get("n")) or 0)
    if n2 < min_samples:
        return Comparison(
            False, f"{target} has {n2} samples in its history, fewer than {min_samples}", figures
        )
    figures["test"] = "the previous version within the threshold and below the fired value"
    if theirs <= alert.threshold and theirs < alert.value:
        return Comparison(
            True,
            f"{target} {key} {theirs:.4g} <= {alert.threshold:.4g} < {alert.value:.4g}",
            figures,
        )
    return Comparison(
        False, f"{target} {key} {theirs:.4g} is not within {alert.threshold:.4g}", figures
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None

"""Alert rules over closed tumbling windows: a threshold breached for N consecutive windows
of one model version fires one `serving.alert`; the first window that no longer breaches it
resolves it (one matching `resolved` event). Pure state machine; the engine publishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from mlbus.schemas.serving import ServingAlert, ServingMetrics


@dataclass(frozen=True)
class Thresholds:
    windows: int
    max_error_rate: float
    max_latency_p99_seconds: float
    max_psi: float


def measured(
    metrics: ServingMetrics, thresholds: Thresholds
) -> dict[str, tuple[str, float, float]]:
    """rule → (metric, value, threshold) for every rule this window can be judged on. A window
    with no drift figure is not judged on psi (neither breach nor recovery)."""
    out = {"error_rate": ("error_rate", metrics.error_rate, thresholds.max_error_rate)}
    if metrics.latency_seconds is not None:
        out["latency_p99"] = (
            "latency_seconds.p99",
            metrics.latency_seconds.p99,
            thresholds.max_latency_p99_seconds,
        )
    if metrics.psi:
        features = {k: v for k, v in metrics.psi.items() if not k.startswith("predicted_")}
        if features:
            worst = max(features, key=lambda k: features[k])
            out["psi"] = (f"psi.{worst}", features[worst], thresholds.max_psi)
    return out


def evaluate(
    state: dict[str, Any], metrics: ServingMetrics, thresholds: Thresholds
) -> list[ServingAlert]:
    """Advance the per-rule state (`{rule: {"run": n, "firing": bool}}`, JSON, changed in
    place) by one closed window; return the alert events it causes."""
    out = []
    for rule, (metric, value, threshold) in measured(metrics, thresholds).items():
        rule_state = state.setdefault(rule, {"run": 0, "firing": False})
        if value > threshold:
            rule_state["run"] += 1
            if rule_state["run"] >= thresholds.windows and not rule_state["firing"]:
                rule_state["firing"] = True
                out.append(
                    _alert(
                        metrics,
                        rule,
                        "firing",
                        metric,
                        value,
                        threshold,
                        rule_state["run"],
                        f"{metric} {value:.4g} > {threshold:.4g} for {rule_state['run']} "
                        f"consecutive windows",
                    )
                )
        else:
            if rule_state["firing"]:
                out.append(
                    _alert(
                        metrics,
                        rule,
                        "resolved",
                        metric,
                        value,
                        threshold,
                        max(1, rule_state["run"]),
                        f"{metric} {value:.4g} <= {threshold:.4g} again",
                    )
                )
            rule_state["run"] = 0
            rule_state["firing"] = False
    return out


def _alert(
    metrics: ServingMetrics,
    rule: str,
    status: Literal["firing", "resolved"],
    metric: str,
    value: float,
    threshold: float,
    windows: int,
    reason: str,
) -> ServingAlert:
    end: datetime = metrics.window_end
    return ServingAlert(
        model=metrics.model,
        version=metrics.version,
        alert=rule,
        status=status,
        metric=metric,
        value=value,
        threshold=threshold,
        windows=windows,
        window_end=end,
        reason=reason,
    )

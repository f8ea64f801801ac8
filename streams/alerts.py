"""Alert rules over closed tumbling windows: a rule breached for N consecutive judged windows
of one model version fires one `serving.alert`; the first judged window that no longer
breaches it resolves it (one matching `resolved` event). Pure state machine; the engine
(streams/windows.py) and the feedback join (streams/feedback.py) publish.

A window is judged only with `min_samples` samples, and only by a test that noise cannot
pass: an error ratio breaches when the lower bound of its Wilson interval is above the
threshold (server-side errors over requests not refused for their input); accuracy when the
upper bound of its interval is below the threshold; drift (PSI) when the worst feature's PSI
is above both the threshold and the PSI that sampling noise alone gives at the window's size
(mlbus/stats.py). Drift only alerts (`rollback: false`). Each version's recent windows are
kept as history (`_h` in its state), and a firing alert carries, as evidence, the test and
the history of the model's other versions on the same metric: what a rollback compares.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import JsonValue

from mlbus.schemas.serving import ServingAlert, ServingMetrics
from mlbus.settings import StreamsSettings
from mlbus.stats import psi_noise, wilson

#: The rules that may roll back (a pipeline names which); drift is not one of them.
DRIFT = "psi"
HISTORY = "_h"
#: Fields of one history entry (a closed window): end (ms), valid requests, server errors,
#: p99 latency (None: no sample).
ENTRY = ("end", "n", "errors", "p99")


@dataclass(frozen=True)
class Thresholds:
    windows: int
    max_error_rate: float
    max_latency_p99_seconds: float
    max_psi: float
    min_samples: int = 100
    confidence: float = 0.99
    psi_quantile: float = 0.99
    history: int = 60
    min_accuracy: float = 0.9
    max_rmse: float | None = None

    @classmethod
    def from_settings(cls, s: StreamsSettings) -> Thresholds:
        return cls(
            windows=s.alert_windows,
            max_error_rate=s.max_error_rate,
            max_latency_p99_seconds=s.max_latency_p99_seconds,
            max_psi=s.max_psi,
            min_samples=s.min_samples,
            confidence=s.confidence,
            psi_quantile=s.psi_noise_quantile,
            history=s.history_windows,
            min_accuracy=s.min_accuracy,
            max_rmse=s.max_rmse,
        )


@dataclass(frozen=True)
class Drift:
    """What the psi rule needs beside the window: the baseline's expected bin probabilities
    per feature, its identity (seeds the noise floor) and the rows binned in the window."""

    dataset: str
    expected: tuple[tuple[float, ...], ...]
    rows: int


@dataclass(frozen=True)
class Verdict:
    """One rule on one window: breached or not, with what it was judged on."""

    metric: str
    value: float
    threshold: float
    breach: bool
    samples: int
    figures: dict[str, JsonValue]
    rollback: bool = True
    test: str = ""


def judge(metrics: ServingMetrics, t: Thresholds, drift: Drift | None = None) -> dict[str, Verdict]:
    """rule → verdict for every rule this window can be judged on: enough samples, and
    (psi) a drift figure. A rule not judged neither breaches nor recovers."""
    out: dict[str, Verdict] = {}
    n = metrics.requests - metrics.client_errors
    if n >= t.min_samples:
        low, high = wilson(metrics.errors, n, t.confidence)
        out["error_rate"] = Verdict(
            "error_rate",
            metrics.error_rate,
            t.max_error_rate,
            low > t.max_error_rate,
            n,
            {"n": n, "errors": metrics.errors, "lower": round(low, 6), "upper": round(high, 6)},
            test=f"lower bound of the Wilson interval at {t.confidence} above the threshold",
        )
    if metrics.latency_seconds is not None and metrics.requests >= t.min_samples:
        p99 = metrics.latency_seconds.p99
        out["latency_p99"] = Verdict(
            "latency_seconds.p99",
            p99,
            t.max_latency_p99_seconds,
            p99 > t.max_latency_p99_seconds,
            metrics.requests,
            {"n": metrics.requests, "p99": p99},
            test="p99 of the window above the threshold",
        )
    if metrics.psi and drift is not None and drift.rows >= t.min_samples:
        features = {k: v for k, v in metrics.psi.items() if not k.startswith("predicted_")}
        if features:
            worst = max(features, key=lambda k: features[k])
            floor = noise_floor(drift.dataset, drift.expected, drift.rows, t.psi_quantile)
            bar = max(t.max_psi, floor)
            out[DRIFT] = Verdict(
                f"psi.{worst}",
                features[worst],
                t.max_psi,
                features[worst] > bar,
                drift.rows,
                {"rows": drift.rows, "noise_floor": round(floor, 6), "bar": round(bar, 6)},
                rollback=False,
                test=f"worst feature's PSI above the threshold and above the {t.psi_quantile} "
                f"quantile of the worst PSI of {drift.rows} rows drawn from the baseline",
            )
    return out


@functools.lru_cache(maxsize=256)
def noise_floor(
    dataset: str, expected: tuple[tuple[float, ...], ...], rows: int, quantile: float
) -> float:
    """`psi_noise` of a baseline at a window size, computed once per (baseline, size): a
    replay closes thousands of windows of the same few sizes."""
    return psi_noise(expected, rows, quantile, f"{dataset}|{rows}")


def record(state: dict[str, Any], metrics: ServingMetrics, history: int) -> None:
    """Keep the window in the version's history (what a rollback to it is compared with)."""
    if metrics.requests == 0:
        return
    entries = state.setdefault(HISTORY, [])
    p99 = metrics.latency_seconds.p99 if metrics.latency_seconds is not None else None
    n = metrics.requests - metrics.client_errors
    entries.append([_ms(metrics.window_end), n, metrics.errors, p99])
    del entries[:-history]


def summary(entries: Sequence[Sequence[Any]], rule: str) -> dict[str, JsonValue] | None:
    """A version's history on one rule's metric, as evidence (None: nothing to show)."""
    rows = [dict(zip(ENTRY, e, strict=True)) for e in entries]
    if not rows:
        return None
    span: dict[str, JsonValue] = {
        "windows": len(rows),
        "from": _iso(rows[0]["end"]),
        "to": _iso(rows[-1]["end"]),
    }
    if rule == "error_rate":
        n = sum(r["n"] for r in rows)
        k = sum(r["errors"] for r in rows)
        return span | {"n": n, "k": k, "rate": k / n if n else None}
    if rule == "latency_p99":
        values = [r["p99"] for r in rows if r["p99"] is not None]
        if not values:
            return None
        return span | {"n": sum(r["n"] for r in rows), "p99_median": statistics.median(values)}
    return None


def evaluate(
    state: dict[str, Any],
    metrics: ServingMetrics,
    thresholds: Thresholds,
    *,
    drift: Drift | None = None,
    siblings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ServingAlert]:
    """Advance the per-rule state (`{rule: {"run": n, "firing": bool, "w": [...]}}` and the
    history, JSON, changed in place) by one closed window; return the alert events it
    causes. `siblings`: the states of the model's other versions (their histories)."""
    record(state, metrics, thresholds.history)
    verdicts = judge(metrics, thresholds, drift)
    return advance(
        state,
        verdicts,
        metrics.model,
        metrics.version,
        metrics.window_end,
        thresholds,
        lambda rule: {
            v: found
            for v, s in sorted((siblings or {}).items())
            if (found := summary(s.get(HISTORY, []), rule)) is not None
        },
    )


def advance(
    state: dict[str, Any],
    verdicts: Mapping[str, Verdict],
    model: str,
    version: str,
    window_end: datetime,
    thresholds: Thresholds,
    others: Any,
) -> list[ServingAlert]:
    """The state machine shared by every rule: N consecutive breaches fire, the first judged
    window without a breach resolves. `others(rule)` gives the other versions' histories."""
    out = []
    for rule, v in verdicts.items():
        rule_state = state.setdefault(rule, {"run": 0, "firing": False})
        if v.breach:
            rule_state["run"] += 1
            run = rule_state.setdefault("w", [])
            run.append({"end": _iso(_ms(window_end)), "value": v.value, **v.figures})
            del run[: -thresholds.windows]
            if rule_state["run"] >= thresholds.windows and not rule_state["firing"]:
                rule_state["firing"] = True
                evidence: dict[str, JsonValue] = {
                    "test": v.test,
                    "min_samples": thresholds.min_samples,
                    "confidence": thresholds.confidence,
                    "windows": list(run),
                    "pooled": _pooled(run),
                    "others": others(rule),
                }
                out.append(
                    _alert(
                        model,
                        version,
                        window_end,
                        rule,
                        "firing",
                        v,
                        rule_state["run"],
                        f"{v.metric} {v.value:.4g} breaches {v.threshold:.4g} for "
                        f"{rule_state['run']} consecutive windows ({v.test}, "
                        f"≥ {thresholds.min_samples} samples each)",
                        samples=sum(int(w.get("n", w.get("rows", 0))) for w in run),
                        evidence=evidence,
                    )
                )
        else:
            if rule_state["firing"]:
                out.append(
                    _alert(
                        model,
                        version,
                        window_end,
                        rule,
                        "resolved",
                        v,
                        max(1, rule_state["run"]),
                        f"{v.metric} {v.value:.4g} no longer breaches {v.threshold:.4g}",
                    )
                )
            rule_state["run"] = 0
            rule_state["firing"] = False
            rule_state.pop("w", None)
    return out


def _pooled(run: list[dict[str, Any]]) -> dict[str, JsonValue]:
    """The firing run's counts added up (proportion rules): what a comparison tests."""
    out: dict[str, JsonValue] = {}
    for key in ("n", "errors", "wrong", "labelled", "sq_error"):
        values = [w[key] for w in run if isinstance(w.get(key), int | float)]
        if values:
            out[key] = sum(values)
    return out


def _ms(at: datetime) -> int:
    return round(at.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _alert(
    model: str,
    version: str,
    window_end: datetime,
    rule: str,
    status: Literal["firing", "resolved"],
    verdict: Verdict,
    windows: int,
    reason: str,
    *,
    samples: int | None = None,
    evidence: dict[str, JsonValue] | None = None,
) -> ServingAlert:
    return ServingAlert(
        model=model,
        version=version,
        alert=rule,
        status=status,
        metric=verdict.metric,
        value=verdict.value,
        threshold=verdict.threshold,
        windows=windows,
        window_end=window_end,
        reason=reason,
        samples=samples if samples is not None else verdict.samples,
        rollback=verdict.rollback,
        evidence=evidence or {},
    )

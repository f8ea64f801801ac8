"""The alert rules' tests (pure): a window is judged only with enough samples, an error ratio
breaches by the lower bound of its Wilson interval over server-side errors only, and drift by
a PSI above the noise floor of its sample size, which traffic drawn from the training data
itself does not reach even where the raw threshold would fire (the digits case: 64 features,
~200 rows a window)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mlbus.schemas.serving import Quantiles, ServingMetrics
from mlbus.stats import psi, psi_noise, wilson
from mlbus.streams.alerts import Drift, Thresholds, evaluate, judge

T = Thresholds(windows=3, max_error_rate=0.05, max_latency_p99_seconds=0.5, max_psi=0.2)
END = datetime(2026, 1, 1, tzinfo=UTC)


def window(n: int, errors: int = 0, client: int = 0, **extra: object) -> ServingMetrics:
    valid = n - client
    return ServingMetrics(
        model="m",
        version="v2",
        window_start=END,
        window_end=END,
        requests=n,
        errors=errors,
        client_errors=client,
        error_rate=errors / valid if valid else 0.0,
        latency_seconds=Quantiles(p50=0.01, p95=0.02, p99=0.03, mean=0.01, max=0.05),
        **extra,  # type: ignore[arg-type]  # the optional fields of the payload
    )


def test_wilson_interval_is_inside_0_1_and_narrows_with_samples():
    assert wilson(0, 0, 0.99) == (0.0, 1.0)
    low, high = wilson(0, 10, 0.99)
    assert low == 0.0 and 0 < high < 1
    assert wilson(30, 300, 0.99)[0] > wilson(3, 30, 0.99)[0]


@pytest.mark.parametrize(
    ("n", "errors", "client", "breach"),
    [
        (20, 20, 0, None),  # every request failed, but 20 is below the minimum: not judged
        (300, 30, 0, True),  # 10 %: the interval's lower bound is above 5 %
        (300, 21, 0, False),  # 7 %: above 5 %, but not beyond noise at 300
        (600, 0, 300, False),  # half refused for the client's input: no server error
        (400, 0, 350, None),  # 50 valid requests left: not judged
    ],
)
def test_error_ratio_rule(n, errors, client, breach):
    verdicts = judge(window(n, errors, client), replace_min(100))
    if breach is None:
        assert "error_rate" not in verdicts
    else:
        assert verdicts["error_rate"].breach is breach


def replace_min(min_samples: int) -> Thresholds:
    return Thresholds(
        windows=3,
        max_error_rate=0.05,
        max_latency_p99_seconds=0.5,
        max_psi=0.2,
        min_samples=min_samples,
    )


def test_fires_after_three_breached_windows_with_the_history_of_other_versions():
    state: dict = {}
    v1: dict = {}
    for _ in range(5):  # v1's history: 300 requests a window, no error
        evaluate(v1, window(300).model_copy(update={"version": "v1"}), T)
    alerts = []
    for _ in range(3):
        alerts += evaluate(state, window(300, 30), T, siblings={"v1": v1})
    (alert,) = alerts
    assert (alert.alert, alert.status, alert.windows, alert.rollback) == (
        "error_rate",
        "firing",
        3,
        True,
    )
    assert alert.samples == 900
    assert alert.evidence["pooled"] == {"n": 900, "errors": 90}
    assert alert.evidence["others"]["v1"]["n"] == 1500 and alert.evidence["others"]["v1"]["k"] == 0
    (resolved,) = evaluate(state, window(300, 0), T, siblings={"v1": v1})
    assert resolved.status == "resolved"


def digits_baseline() -> tuple[np.ndarray, tuple[tuple[float, ...], ...], list[np.ndarray]]:
    x, _ = load_digits(return_X_y=True)
    edges: list[np.ndarray] = []
    expected: list[tuple[float, ...]] = []
    for j in range(x.shape[1]):
        counts, e = np.histogram(x[:, j], bins=10)
        edges.append(e)
        expected.append(tuple((counts / counts.sum()).tolist()))
    return x, tuple(expected), edges


def binned(rows: np.ndarray, edges: list[np.ndarray]) -> list[list[int]]:
    out = []
    for j, e in enumerate(edges):
        i = np.clip(np.searchsorted(e, rows[:, j], side="right") - 1, 0, len(e) - 2)
        out.append(np.bincount(i, minlength=len(e) - 1).tolist())
    return out


def test_traffic_from_the_training_data_is_under_the_noise_floor_a_shift_is_not():
    x, expected, edges = digits_baseline()
    rng = random.Random(1)
    floor = psi_noise(expected, 200, 0.99, "digits|200")
    raw_breaches = judged_breaches = 0
    for _ in range(30):
        rows = x[[rng.randrange(len(x)) for _ in range(200)]]
        values = [psi(e, c) for e, c in zip(expected, binned(rows, edges), strict=True)]
        worst = max(v for v in values if v is not None)
        raw_breaches += worst > 0.2
        metrics = window(200, psi={f"f{j}": v for j, v in enumerate(values) if v is not None})
        verdict = judge(metrics, T, Drift("digits", expected, 200))["psi"]
        judged_breaches += verdict.breach
        assert verdict.rollback is False
        assert verdict.figures["noise_floor"] == round(floor, 6)
    # The raw threshold sits at the noise of a 200-row window; the noise floor does not.
    assert floor > 0.2 and raw_breaches > 0 and judged_breaches == 0
    shifted = np.clip(x[:200] + 6.0, 0, 16)
    values = [psi(e, c) for e, c in zip(expected, binned(shifted, edges), strict=True)]
    metrics = window(200, psi={f"f{j}": v for j, v in enumerate(values) if v is not None})
    assert judge(metrics, T, Drift("digits", expected, 200))["psi"].breach

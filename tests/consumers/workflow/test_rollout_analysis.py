"""A canary step's analysis (pure): the exact test it aborts on, the criteria it waits for,
and the windows it counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from scipy.stats import fisher_exact

from mlbus.consumers.workflow import rollout as rollouts
from mlbus.schemas.codec import wrap
from mlbus.schemas.serving import Quantiles, ServingMetrics
from mlbus.schemas.traffic import ModelTraffic, TrafficCriteria
from mlbus.stats import fisher_worse

T0 = datetime(2026, 3, 1, 14, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("k1", "n1", "k2", "n2"),
    [(1, 100, 0, 720), (20, 100, 1, 700), (0, 50, 3, 900), (5, 200, 5, 200), (30, 30, 0, 10)],
)
def test_the_exact_test_agrees_with_scipy(k1, n1, k2, n2):
    _, expected = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="greater")
    assert fisher_worse(k1, n1, k2, n2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def metrics(version: str, start: datetime, requests: int, errors: int = 0, p99: float = 0.01):
    data = ServingMetrics(
        model="m",
        version=version,
        window_start=start,
        window_end=start + timedelta(seconds=10),
        requests=requests,
        errors=errors,
        error_rate=errors / requests,
        latency_seconds=Quantiles(p50=p99, p95=p99, p99=p99, mean=p99, max=p99),
    )
    return wrap(data, source="test")


def canary(**criteria) -> rollouts.Step:
    traffic = ModelTraffic(
        model="m",
        rollout_id="r",
        strategy="canary",
        status="started",
        stable="1",
        candidate="2",
        weights={"1": 90, "2": 10},
        steps=[10, 100],
        criteria=TrafficCriteria(min_samples=100, **criteria),
        reason="test",
        actor="test",
    )
    return rollouts.Step(traffic, T0)


def test_one_error_is_no_evidence_and_a_slow_candidate_is_aborted():
    step = canary()
    step.add_metrics(metrics("1", T0, 720))
    step.add_metrics(metrics("2", T0, 100, errors=1))
    decision = step.decide()
    assert decision.verdict == "advance", decision.reason
    slow = canary(max_latency_ratio=2.0)
    slow.add_metrics(metrics("1", T0, 900, p99=0.010))
    slow.add_metrics(metrics("2", T0, 100, p99=0.025))
    decision = slow.decide()
    assert decision.verdict == "abort" and decision.reason.startswith("latency p99 0.025s")
    nxt = rollouts.decide(slow, "cause", "mlbus/workflow")
    assert nxt is not None and (nxt.status, nxt.weights) == ("aborted", {"1": 100})


def test_windows_before_the_step_or_of_other_versions_and_hopping_views_are_not_counted():
    step = canary()
    hopping = metrics("2", T0, 500).model_copy(
        update={"data": metrics("2", T0, 500).data.model_copy(update={"window": "hopping"})}
    )
    assert not step.add_metrics(hopping)
    assert not step.add_metrics(metrics("2", T0 - timedelta(seconds=1), 500))
    assert not step.add_metrics(metrics("3", T0, 500))
    counted = metrics("2", T0, 60)
    assert step.add_metrics(counted) and not step.add_metrics(counted)  # once, by id
    assert step.decide().verdict == "wait"

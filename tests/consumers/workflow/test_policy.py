"""The promotion policy as a pure function: thresholds (a budget not reported is not met),
the champion on the same evaluation data, the margin, min-mode metrics, and re-evaluation
when the data differ."""

from __future__ import annotations

from mlbus.consumers.workflow.policy import Champion, judge
from mlbus.schemas.training import Split
from mlbus.schemas.workflow import PromotionPolicy, Threshold
from tests.consumers.workflow.support import completed

POLICY = PromotionPolicy(
    name="p", version=3, margin=0.01,
    thresholds=[Threshold(metric="test.accuracy", value=0.9),
                Threshold(metric="inference.latency_p95_ms", op="<=", value=10)],
)  # fmt: skip
SPLIT = Split()


def champion(accuracy: float = 0.92, **changes) -> Champion:
    return Champion("old", completed("m", "old", accuracy, **changes), SPLIT)


def test_thresholds_come_first_and_name_what_failed():
    verdict = judge(POLICY, completed(accuracy=0.85), SPLIT, None)
    assert not verdict.promote and verdict.reason == "threshold test.accuracy >= 0.9 not met (0.85)"
    no_latency = completed(accuracy=0.99).model_copy(
        update={"metrics": {"test": {"accuracy": 0.99}}}
    )
    verdict = judge(POLICY, no_latency, SPLIT, None)
    assert verdict.reason == "threshold inference.latency_p95_ms <= 10 not met (not reported)"
    assert [t["passed"] for t in verdict.evidence["thresholds"]] == [True, False]


def test_without_a_champion_the_thresholds_decide():
    verdict = judge(POLICY, completed(accuracy=0.91), SPLIT, None)
    assert verdict.promote and verdict.evidence["champion"] is None
    assert verdict.evidence["candidate"]["metrics"]["test.accuracy"] == 0.91


def test_the_champion_must_be_beaten_by_the_margin_on_the_same_data():
    assert not judge(POLICY, completed(accuracy=0.925), SPLIT, champion(0.92)).promote
    verdict = judge(POLICY, completed(accuracy=0.93), SPLIT, champion(0.92))
    assert verdict.promote and verdict.evidence["champion"]["test.accuracy"] == 0.92
    exact = PromotionPolicy(name="p", margin=0.0)
    assert not judge(exact, completed(accuracy=0.92), SPLIT, champion(0.92)).promote  # a tie


def test_a_loss_is_better_when_lower():
    policy = PromotionPolicy(name="p", metric="test.loss", mode="min", margin=0.02)
    # completed() sets loss = 1 - accuracy
    assert judge(policy, completed(accuracy=0.95), SPLIT, champion(0.92)).promote
    assert not judge(policy, completed(accuracy=0.93), SPLIT, champion(0.92)).promote


def test_other_data_is_re_evaluated_or_not_compared():
    other = champion(0.99, dataset_version="v0")
    verdict = judge(POLICY, completed(accuracy=0.95), SPLIT, other)
    assert not verdict.promote and "no evaluator configured" in verdict.reason
    calls = []

    def evaluator(old, new, split):
        calls.append((old.version, new.version, split))
        return {"test.accuracy": 0.9, "test.loss": 0.3}

    verdict = judge(POLICY, completed(accuracy=0.95), SPLIT, other, evaluator)
    assert verdict.promote and calls == [("old", "r1", SPLIT)]
    assert verdict.evidence["champion"]["evaluation"] == "re-evaluated on the candidate's test rows"
    seeded = champion(0.99, seed=7)  # another seed is another test set too
    assert judge(POLICY, completed(accuracy=0.95), SPLIT, seeded, evaluator).promote


def test_a_tie_at_the_policys_precision_keeps_the_champion():
    """133/135 as float32 (the trainer's) and as float64 differ only past float32's digits:
    the same metric, a tie, which is not "strictly better"."""
    float32, float64 = 0.9851852059364319, 0.9851851851851852
    exact = PromotionPolicy(name="p", margin=0.0)
    verdict = judge(exact, completed(accuracy=float32), SPLIT, champion(float64))
    assert not verdict.promote
    assert verdict.reason == (
        "ties champion old on test.accuracy: 0.985185 vs 0.985185 at 6 significant digits; "
        "a tie keeps the champion"
    )
    assert verdict.evidence["precision"] == "6 significant digits"
    assert "a tie keeps the champion" in verdict.evidence["rule"]
    assert verdict.evidence["comparison"] == {
        "candidate": "0.985185",
        "champion": "0.985185",
        "gain": "0.000000",
        "tie": True,
    }
    # One unit in the sixth digit is a win, whichever float carried it.
    better = judge(exact, completed(accuracy=0.985186), SPLIT, champion(float64))
    assert better.promote and better.evidence["comparison"]["tie"] is False


def test_a_gain_of_exactly_the_margin_counts_and_thresholds_use_the_same_precision():
    # In binary floats 0.905 - 0.805 is 0.09999999999999998, short of a 0.1 margin.
    policy = PromotionPolicy(
        name="p", margin=0.1, thresholds=[Threshold(metric="test.accuracy", value=0.9)]
    )
    verdict = judge(policy, completed(accuracy=0.905), SPLIT, champion(0.805))
    assert verdict.promote and verdict.evidence["comparison"]["gain"] == "0.100"
    # float32's 0.9 is 0.8999999762: the same metric as the bar, so it meets ">= 0.9".
    at_bar = judge(policy, completed(accuracy=0.8999999761581421), SPLIT, None)
    assert at_bar.promote and at_bar.evidence["thresholds"][0]["passed"]
    below = judge(policy, completed(accuracy=0.899999), SPLIT, None)
    assert not below.promote


def test_a_regression_model_is_judged_on_rmse_in_min_mode_and_never_on_accuracy():
    rmse = PromotionPolicy(
        name="r", metric="test.rmse", mode="min",
        thresholds=[Threshold(metric="test.r2", value=0.2)],
    )  # fmt: skip

    def regression(value: float, r2: float = 0.4):
        run = completed("m", "new", 0.0)
        return run.model_copy(
            update={"task": "regression", "metrics": {"test": {"rmse": value, "r2": r2}}}
        )

    verdict = judge(rmse, regression(55.0), SPLIT, None)
    assert verdict.promote, verdict.reason
    old = Champion("old", regression(60.0).model_copy(update={"version": "old"}), SPLIT)
    assert judge(rmse, regression(55.0), SPLIT, old).promote
    assert not judge(rmse, regression(65.0), SPLIT, old).promote
    verdict = judge(POLICY, regression(55.0), SPLIT, None)
    assert not verdict.promote
    assert verdict.reason.startswith(
        "policy p uses test.accuracy, which a regression model does not report"
    )

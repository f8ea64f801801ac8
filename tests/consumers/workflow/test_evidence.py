"""Whether the version a rollback goes back to does better, from what the alert carries
(pure): a significant difference on a proportion with enough history, not merely a lower
figure; latency within the threshold; nothing without history."""

from __future__ import annotations

from mlbus.consumers.workflow.evidence import compare
from tests.consumers.workflow.support import alert


def test_a_significantly_lower_error_ratio_is_evidence():
    found = compare(alert("m1", "c", others={"b": (2, 1000)}), "b")
    assert found.better and found.figures["p_value"] < 0.01
    assert found.evidence()["previous"] == {"version": "b", "windows": 10, "n": 1000, "k": 2}


def test_a_lower_but_not_significant_ratio_or_a_short_history_is_not():
    # c: 120 errors in 600 (20 %); b: 17 in 100 (17 %): lower, but within noise.
    assert not compare(alert("m1", "c", others={"b": (17, 100)}), "b").better
    # b did better, on 50 requests: fewer than the rule's minimum samples.
    short = compare(alert("m1", "c", others={"b": (0, 50)}), "b")
    assert not short.better and "fewer than 100" in short.reason


def test_no_history_of_the_target_is_no_evidence():
    found = compare(alert("m1", "c", others={}), "b")
    assert not found.better and "no history of b" in found.reason


def test_accuracy_compares_wrong_answers_over_labels():
    wrong = alert("m1", "c", name="accuracy").model_copy(
        update={
            "metric": "accuracy",
            "value": 0.8,
            "threshold": 0.9,
            "evidence": {
                "confidence": 0.99,
                "min_samples": 100,
                "pooled": {"n": 900, "labelled": 900, "wrong": 180},
                "others": {"b": {"n": 3000, "k": 90}},
            },
        }
    )
    assert compare(wrong, "b").better

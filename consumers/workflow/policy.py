"""The promotion policy, as a pure function of a candidate run, the champion and the policy:
absolute thresholds first, then "beat the champion on the same evaluation data by the
margin". The verdict carries the reason and the evidence that `model.promoted` /
`model.rejected` publish, so an audit reads why without re-running anything.

Same evaluation data: the champion's recorded metrics are comparable when it was trained
on the same dataset version with the same seed and split (then its test rows are the
candidate's). Otherwise the service asks an `Evaluator` to re-evaluate the champion on the
candidate's test rows; without one, the comparison is refused (rejected, not guessed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlbus.schemas.training import Split, TrainingCompleted
from mlbus.schemas.workflow import PromotionPolicy, Threshold

#: (champion run, candidate run, candidate's split) → the champion's metrics ("test.accuracy",
#: "test.loss") on the candidate's test rows, or None if it cannot be done.
Evaluator = Callable[[TrainingCompleted, TrainingCompleted, Split], dict[str, float] | None]


def metric(run: TrainingCompleted, name: str) -> float | None:
    """`split.metric` of a run (`test.accuracy`, `inference.latency_p95_ms`), None if absent."""
    split, _, key = name.partition(".")
    value = run.metrics.get(split, {}).get(key)
    return None if value is None or math.isnan(value) else value


def flat_metrics(run: TrainingCompleted) -> dict[str, float]:
    return {
        f"{s}.{k}": v
        for s, values in run.metrics.items()
        for k, v in values.items()
        if not math.isnan(v)  # an empty split: JSON has no NaN
    }


def passes(threshold: Threshold, value: float | None) -> bool:
    if value is None:
        return False  # not measured is not passed: a budget must be shown to hold
    return value >= threshold.value if threshold.op == ">=" else value <= threshold.value


def better(policy: PromotionPolicy, candidate: float, champion: float) -> bool:
    """Better by at least the margin (strictly better when the margin is 0)."""
    gain = candidate - champion if policy.mode == "max" else champion - candidate
    return gain > 0 if policy.margin == 0 else gain >= policy.margin


@dataclass(frozen=True)
class Champion:
    version: str
    run: TrainingCompleted | None  # None: its training.completed is not in the log
    split: Split | None  # None with `run`


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    evidence: dict[str, Any]


def same_data(champion: Champion, candidate: TrainingCompleted, split: Split) -> bool:
    run = champion.run
    return (
        run is not None
        and run.dataset == candidate.dataset
        and run.seed == candidate.seed
        and champion.split == split
    )


def judge(
    policy: PromotionPolicy,
    candidate: TrainingCompleted,
    split: Split,
    champion: Champion | None,
    evaluator: Evaluator | None = None,
) -> Verdict:
    checks = []
    for threshold in policy.thresholds:
        value = metric(candidate, threshold.metric)
        checks.append(
            threshold.model_dump() | {"actual": value, "passed": passes(threshold, value)}
        )
    evidence: dict[str, Any] = {
        "candidate": {
            "version": candidate.version,
            "run_id": candidate.run_id,
            "dataset": candidate.dataset.model_dump(),
            "metrics": flat_metrics(candidate),
        },
        "thresholds": checks,
        "metric": policy.metric,
        "mode": policy.mode,
        "margin": policy.margin,
    }
    failed = [c for c in checks if not c["passed"]]
    if failed:
        first = failed[0]
        shown = "not reported" if first["actual"] is None else f"{first['actual']:.4g}"
        return Verdict(
            False,
            f"threshold {first['metric']} {first['op']} {first['value']:g} not met ({shown})",
            evidence,
        )
    mine = metric(candidate, policy.metric)
    if mine is None:
        return Verdict(False, f"the run does not report {policy.metric}", evidence)
    if champion is None:
        evidence["champion"] = None
        return Verdict(
            True, f"thresholds met, no champion to beat ({policy.metric} {mine:.4g})", evidence
        )
    theirs, how = _champion_metric(policy, champion, candidate, split, evaluator)
    evidence["champion"] = {
        "version": champion.version,
        "evaluation": how,
        "run_id": champion.run.run_id if champion.run else None,
        policy.metric: theirs,
    }
    if theirs is None:
        return Verdict(
            False,
            f"cannot compare with champion {champion.version} on the same evaluation data ({how})",
            evidence,
        )
    if better(policy, mine, theirs):
        return Verdict(
            True,
            f"beats champion {champion.version} on {policy.metric}: {mine:.4g} vs {theirs:.4g} "
            f"(margin {policy.margin:g})",
            evidence,
        )
    return Verdict(
        False,
        f"does not beat champion {champion.version} on {policy.metric}: {mine:.4g} vs "
        f"{theirs:.4g} (margin {policy.margin:g})",
        evidence,
    )


def _champion_metric(
    policy: PromotionPolicy,
    champion: Champion,
    candidate: TrainingCompleted,
    split: Split,
    evaluator: Evaluator | None,
) -> tuple[float | None, str]:
    if same_data(champion, candidate, split):
        assert champion.run is not None
        return metric(champion.run, policy.metric), "recorded (same dataset version, seed, split)"
    if champion.run is None:
        return None, "the champion's training.completed is not in the log"
    if not policy.metric.startswith("test."):
        return None, f"{policy.metric} was measured on other data and only test.* is re-evaluated"
    if evaluator is None:
        return None, "different evaluation data and no evaluator configured"
    measured = evaluator(champion.run, candidate, split)
    if measured is None or policy.metric not in measured:
        return None, "re-evaluation on the candidate's test rows failed"
    return measured[policy.metric], "re-evaluated on the candidate's test rows"

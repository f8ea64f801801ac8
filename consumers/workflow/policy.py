"""The promotion policy, as a pure function of a candidate run, the champion and the policy:
absolute thresholds first, then "beat the champion on the same evaluation data by the
margin". The verdict carries the reason and the evidence that `model.promoted` /
`model.rejected` publish, so an audit reads why without re-running anything.

One precision: every comparison (a threshold, the champion) is made on the metrics rounded to
`PRECISION` significant digits, in decimal. The trainer computes metrics in float32, which
carries 6 significant digits, so the float32 and the float64 rendering of one value
(0.9851852059 and 0.9851851852) are the same metric; digits beyond that are noise, and a
metric that equals the champion's at that precision is a tie, which keeps the champion
(`TIE_RULE`). The evidence states the precision, the rule and the rounded values.

Same evaluation data: the champion's recorded metrics are comparable when it was trained
on the same dataset version with the same seed and split (then its test rows are the
candidate's). Otherwise the service asks an `Evaluator` to re-evaluate the champion on the
candidate's test rows; without one, the comparison is refused (rejected, not guessed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from mlbus.families import TASK_METRICS
from mlbus.schemas.training import Split, TrainingCompleted
from mlbus.schemas.workflow import PromotionPolicy, Threshold

#: (champion run, candidate run, candidate's split) → the champion's metrics ("test.accuracy",
#: "test.loss") on the candidate's test rows, or None if it cannot be done.
Evaluator = Callable[[TrainingCompleted, TrainingCompleted, Split], dict[str, float] | None]


#: Significant digits every metric is compared at: float32's (C's FLT_DIG).
PRECISION = 6
TIE_RULE = (
    f"metrics are compared at {PRECISION} significant digits; a candidate must beat the "
    "champion by at least the margin at that precision, and by more than nothing when the "
    "margin is 0: a tie keeps the champion"
)


def at_precision(value: float) -> Decimal:
    """`value` rounded to `PRECISION` significant digits, exactly (a decimal)."""
    return Decimal(f"{value:.{PRECISION}g}")


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
    # At the one precision: a float32 0.9 (0.8999999762) meets ">= 0.9".
    mine, bar = at_precision(value), Decimal(repr(threshold.value))
    return mine >= bar if threshold.op == ">=" else mine <= bar


def gain(policy: PromotionPolicy, candidate: float, champion: float) -> Decimal:
    """How much better the candidate is, at `PRECISION` (negative: worse)."""
    mine, theirs = at_precision(candidate), at_precision(champion)
    return mine - theirs if policy.mode == "max" else theirs - mine


def better(policy: PromotionPolicy, candidate: float, champion: float) -> bool:
    """Better by at least the margin (strictly better when the margin is 0), at `PRECISION`
    (`TIE_RULE`): the margin is taken as written, so a gain of exactly the margin counts."""
    won = gain(policy, candidate, champion)
    margin = Decimal(repr(policy.margin))
    return won > 0 if margin == 0 else won >= margin


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
        "precision": f"{PRECISION} significant digits",
        "rule": TIE_RULE,
    }
    task = candidate.task or "classification"
    foreign = [
        m
        for m in [policy.metric, *(t.metric for t in policy.thresholds)]
        if not m.startswith("inference.") and m.partition(".")[2] not in TASK_METRICS[task]
    ]
    if foreign:  # test.accuracy of a regression model: the policy cannot judge it
        return Verdict(
            False,
            f"policy {policy.name} uses {foreign[0]}, which a {task} model does not report "
            f"(its metrics: {', '.join(TASK_METRICS[task])})",
            evidence,
        )
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
    won = gain(policy, mine, theirs)
    evidence["comparison"] = {
        "candidate": str(at_precision(mine)),
        "champion": str(at_precision(theirs)),
        "gain": str(won),
        "tie": won == 0,
    }
    shown = f"{at_precision(mine)} vs {at_precision(theirs)}"
    if better(policy, mine, theirs):
        return Verdict(
            True,
            f"beats champion {champion.version} on {policy.metric}: {shown} "
            f"(margin {policy.margin:g})",
            evidence,
        )
    if won == 0:
        return Verdict(
            False,
            f"ties champion {champion.version} on {policy.metric}: {shown} at {PRECISION} "
            "significant digits; a tie keeps the champion",
            evidence,
        )
    return Verdict(
        False,
        f"does not beat champion {champion.version} on {policy.metric}: {shown} "
        f"(margin {policy.margin:g})",
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

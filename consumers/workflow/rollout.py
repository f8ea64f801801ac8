"""Rollouts (`model.traffic`): the events that start, step, complete and abort one, and the
analysis that decides a canary's steps. Pure: no I/O; the service (service.py) and the
manual commands (commands.py) publish what these build.

A canary step is decided from the streams' windows of both versions that began at or after
the step's event time (`serving.metrics` tumbling windows: requests, server errors, client
errors, latency p99; `serving.accuracy` windows: labelled feedback), never the wall clock:
a replay of the same events decides the same. Nothing is decided before the candidate has
served `criteria.min_samples` requests (not counting requests refused for their input) in
the step. Then the step aborts when the candidate does worse than the stable version:

- error ratio: the lower bound of the candidate's Wilson interval above `max_error_ratio`,
  or a one-sided Fisher exact test shows its ratio higher than the stable version's (exact:
  error counts are small, where a z-test's normal approximation calls one error evidence);
- latency p99: the candidate's above `max_latency_ratio` times the stable version's;
- accuracy (only once both have `min_labelled` labels): a one-sided Fisher exact test
  shows the candidate wrong more often.

Otherwise it advances to the next step; the step to 100% completes the rollout, and a
`model.promoted` of the candidate follows with the rollout's evidence. Shadows and A/B
experiments are held: they end by hand (promote the candidate, or abort).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import JsonValue

from mlbus.schemas.envelope import Event
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.serving import ServingAccuracy, ServingMetrics
from mlbus.schemas.traffic import ModelTraffic
from mlbus.stats import fisher_worse, wilson

_NAMESPACE = uuid.UUID("0b6f2a4e-9d1c-4f3e-8a27-5c4e1d2b3f60")

Verdict = Literal["wait", "advance", "abort"]


def step_id(rollout_id: str, step: int, verdict: str) -> str:
    """The id of the traffic event a step's decision publishes: a redelivered or replayed
    window decides the same and publishes nothing new."""
    return str(uuid.uuid5(_NAMESPACE, f"traffic/{rollout_id}/{step}/{verdict}"))


def promotion_id(rollout_id: str) -> str:
    """The id of the `model.promoted` that ends a completed rollout."""
    return str(uuid.uuid5(_NAMESPACE, f"promoted/{rollout_id}"))


def _time(event: Event) -> datetime:
    at = event.time or datetime.now(UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@dataclass
class Figures:
    """One version's windows within a step."""

    windows: list[str] = field(default_factory=list)  # serving.metrics event ids
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    latency_weight: int = 0  # requests of the windows that have a latency p99
    latency_sum: float = 0.0  # their p99s weighted by those requests
    accuracy_windows: list[str] = field(default_factory=list)
    labelled: int = 0
    correct: int = 0
    shadowed: int = 0  # a shadow's answers compared with the ones returned
    agree_sum: float = 0.0  # their agreements (share of rows answered alike), summed

    @property
    def served(self) -> int:
        """Requests not refused for the client's input: the error ratio's denominator."""
        return self.requests - self.client_errors

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.served if self.served else None

    @property
    def latency_p99(self) -> float | None:
        """The windows' p99s weighted by their requests (the windows carry quantiles, not
        their sketches, so this stands for the step's p99)."""
        return self.latency_sum / self.latency_weight if self.latency_weight else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def agreement(self) -> float | None:
        """A shadow's mean agreement with the answers returned."""
        return min(1.0, self.agree_sum / self.shadowed) if self.shadowed else None

    def summary(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "windows": len(self.windows),
            "requests": self.requests,
            "served": self.served,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "error_ratio": _round(self.error_ratio),
            "latency_p99": _round(self.latency_p99),
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": _round(self.accuracy),
            "window_ids": list(self.windows),
            "accuracy_window_ids": list(self.accuracy_windows),
        }
        if self.shadowed:  # a shadow's windows only: a canary's analysis stays as it was
            out |= {"shadowed": self.shadowed, "agreement": _round(self.agreement)}
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    analysis: dict[str, JsonValue]


@dataclass
class Step:
    """The windows of one step of one rollout: `traffic` is the state that began it, and
    windows that began at or after `since` are counted."""

    traffic: ModelTraffic
    since: datetime
    figures: dict[str, Figures] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    #: the newest metrics window's end that was counted (what a decision is "as of")
    until: datetime | None = None

    def __post_init__(self) -> None:
        self.since = _aware(self.since)
        self.figures = {self.traffic.stable: Figures(), self.traffic.candidate: Figures()}

    def add_metrics(self, event: Event[ServingMetrics]) -> bool:
        """Count a tumbling window of either version that began in the step; False if it is
        not one (another model or version, a hopping view, earlier, or seen before)."""
        m: ServingMetrics = event.data
        figures = self.figures.get(m.version)
        if (
            figures is None
            or m.model != self.traffic.model
            or m.window != "tumbling"
            or _aware(m.window_start) < self.since
            or event.id in self._seen
        ):
            return False
        self._seen.add(event.id)
        figures.windows.append(event.id)
        figures.requests += m.requests
        figures.errors += m.errors
        figures.client_errors += m.client_errors
        if m.shadowed and m.agreement is not None:
            figures.shadowed += m.shadowed
            figures.agree_sum += m.agreement * m.shadowed
        if m.latency_seconds is not None and m.requests - m.client_errors > 0:
            weight = m.requests - m.client_errors
            figures.latency_weight += weight
            figures.latency_sum += m.latency_seconds.p99 * weight
        end = _aware(m.window_end)
        self.until = end if self.until is None else max(self.until, end)
        return True

    def add_accuracy(self, event: Event[ServingAccuracy]) -> bool:
        a: ServingAccuracy = event.data
        figures = self.figures.get(a.version)
        if (
            figures is None
            or a.model != self.traffic.model
            or _aware(a.window_start) < self.since
            or event.id in self._seen
        ):
            return False
        self._seen.add(event.id)
        figures.accuracy_windows.append(event.id)
        figures.labelled += a.labelled
        figures.correct += a.correct
        return True

    def decide(self) -> Decision:
        """The step's verdict on the windows counted so far (module doc)."""
        data = self.traffic
        criteria = data.criteria
        candidate, stable = self.figures[data.candidate], self.figures[data.stable]
        analysis: dict[str, JsonValue] = {
            "step": data.step,
            "weights": dict(data.weights),
            "since": self.since.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "criteria": criteria.model_dump(mode="json"),
            "versions": {data.stable: stable.summary(), data.candidate: candidate.summary()},
        }
        if candidate.served < criteria.min_samples:
            reason = (
                f"{data.candidate} has {candidate.served} of the {criteria.min_samples} samples "
                "the step needs"
            )
            return Decision("wait", reason, analysis | {"verdict": "wait"})
        checks: list[dict[str, Any]] = [
            _error_check(candidate, stable, criteria.confidence, criteria.max_error_ratio),
            _latency_check(candidate, stable, criteria.max_latency_ratio),
            _accuracy_check(candidate, stable, criteria.confidence, criteria.min_labelled),
        ]
        analysis["checks"] = checks  # type: ignore[assignment]  # JSON values by construction
        failed = [c for c in checks if c["passed"] is False]
        if failed:
            reason = "; ".join(str(c["reason"]) for c in failed)
            return Decision("abort", reason, analysis | {"verdict": "abort"})
        passed = "; ".join(str(c["reason"]) for c in checks)
        return Decision("advance", passed, analysis | {"verdict": "advance"})


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def analysed(traffic: ModelTraffic) -> bool:
    """Whether the workflow decides this rollout's steps (a canary in progress)."""
    return traffic.active and traffic.strategy == "canary"


def step_of(event: Event[ModelTraffic]) -> Step:
    """The step a traffic event begins. A canary's first step counts windows from the
    event's time; a later one from the end of the last window its decision counted (in the
    analysis it carries), so that every step boundary is an event time in the log and a
    replay from the start decides the same."""
    data: ModelTraffic = event.data
    until = data.analysis.get("until") if data.status == "advanced" else None
    since = datetime.fromisoformat(until) if isinstance(until, str) else _time(event)
    return Step(data, since)


def decide(step: Step, cause: str, actor: str) -> ModelTraffic | None:
    """The traffic state a step's windows so far lead to (None: wait for more samples)."""
    decision = step.decide()
    if decision.verdict == "wait":
        return None
    if decision.verdict == "abort":
        return aborted(
            step.traffic,
            reason=f"step {step.traffic.step + 1} failed: {decision.reason}",
            actor=actor,
            analysis=decision.analysis,
            cause=cause,
        )
    return next_step(step.traffic, decision, actor, cause)


def following(step: Step, decided: ModelTraffic) -> Step | None:
    """The step after `decided` (None once the rollout ended)."""
    if decided.status != "advanced" or step.until is None:
        return None
    return Step(decided, step.until)


def merge(metrics: list[Event], accuracy: list[Event]) -> list[Event]:
    """The order windows read back from the log are counted in, as the workflow meets them
    live: metrics windows in log order (one model's are on one partition: a total order;
    they trigger decisions), each accuracy window before the first metrics window that ends
    no earlier than it. A live accuracy window that arrives after that metrics window is
    counted in the next decision instead; each decision names the windows it counted."""
    waiting = sorted(accuracy, key=lambda e: _aware(e.data.window_end))  # stable: log order
    out: list[Event] = []
    for window in metrics:
        end = _aware(window.data.window_end)
        while waiting and _aware(waiting[0].data.window_end) <= end:
            out.append(waiting.pop(0))
        out.append(window)
    return out + waiting


def compare(current: Event[ModelTraffic], windows: list[Event]) -> Decision:
    """The comparison of a rollout in progress so far, by the analysis that decides a
    canary's steps (the current step's windows; `windows` in `merge` order): a shadow's or an
    A/B experiment's figures, which end only by hand. Nothing is published from it."""
    step = step_of(current)
    for window in windows:
        if window.type == "serving.accuracy":
            step.add_accuracy(window)
        else:
            step.add_metrics(window)
    return step.decide()


def replay(started: Event[ModelTraffic], windows: list[Event], actor: str) -> list[ModelTraffic]:
    """Every decision a canary's windows lead to, from its first traffic event: what the
    workflow publishes, computed again from the log alone. `windows` are `serving.metrics`
    and `serving.accuracy` events in the order the workflow meets them (`merge`)."""
    step: Step | None = step_of(started)
    out: list[ModelTraffic] = []
    for window in windows:
        if step is None:
            break
        if window.type == "serving.accuracy":
            step.add_accuracy(window)
            continue
        if not step.add_metrics(window):
            continue
        decided = decide(step, window.id, actor)
        if decided is not None:
            out.append(decided)
            step = following(step, decided)
    return out


def _error_check(
    candidate: Figures, stable: Figures, confidence: float, limit: float
) -> dict[str, Any]:
    low, high = wilson(candidate.errors, candidate.served, confidence)
    p = fisher_worse(candidate.errors, candidate.served, stable.errors, stable.served)
    check: dict[str, Any] = {
        "metric": "error_ratio",
        "candidate": _round(candidate.error_ratio),
        "stable": _round(stable.error_ratio),
        "wilson": [round(low, 6), round(high, 6)],
        "max_error_ratio": limit,
        "test": "one-sided Fisher exact test: the candidate's rate is higher",
        "p_value": p,
    }
    if low > limit:
        check |= {
            "passed": False,
            "reason": f"error ratio {candidate.errors}/{candidate.served}: lower bound "
            f"{low:.4f} above {limit:g}",
        }
    elif p < 1 - confidence:
        check |= {
            "passed": False,
            "reason": f"error ratio {candidate.errors}/{candidate.served} against "
            f"{stable.errors}/{stable.served}: worse at {confidence} (p = {p:.3g})",
        }
    else:
        check |= {
            "passed": True,
            "reason": f"error ratio {candidate.errors}/{candidate.served} not worse",
        }
    return check


def _latency_check(candidate: Figures, stable: Figures, ratio: float) -> dict[str, Any]:
    mine, theirs = candidate.latency_p99, stable.latency_p99
    check: dict[str, Any] = {
        "metric": "latency_p99",
        "candidate": _round(mine),
        "stable": _round(theirs),
        "max_latency_ratio": ratio,
    }
    if mine is None or theirs is None or theirs <= 0:
        return check | {"passed": None, "reason": "latency p99: no figures of both versions"}
    if mine > theirs * ratio:
        return check | {
            "passed": False,
            "reason": f"latency p99 {mine:.4g}s above {ratio:g} x {theirs:.4g}s",
        }
    return check | {"passed": True, "reason": f"latency p99 {mine:.4g}s within {ratio:g} x"}


def _accuracy_check(
    candidate: Figures, stable: Figures, confidence: float, min_labelled: int
) -> dict[str, Any]:
    check: dict[str, Any] = {
        "metric": "accuracy",
        "candidate": _round(candidate.accuracy),
        "stable": _round(stable.accuracy),
        "labelled": {"candidate": candidate.labelled, "stable": stable.labelled},
        "min_labelled": min_labelled,
    }
    if candidate.labelled < min_labelled or stable.labelled < min_labelled:
        return check | {
            "passed": None,
            "reason": f"accuracy: fewer than {min_labelled} labels of each version",
        }
    wrong_c = candidate.labelled - candidate.correct
    wrong_s = stable.labelled - stable.correct
    p = fisher_worse(wrong_c, candidate.labelled, wrong_s, stable.labelled)
    check |= {
        "test": "one-sided Fisher exact test: the candidate is wrong more often",
        "p_value": p,
    }
    if p < 1 - confidence:
        return check | {
            "passed": False,
            "reason": f"accuracy {candidate.correct}/{candidate.labelled} against "
            f"{stable.correct}/{stable.labelled}: worse at {confidence} (p = {p:.3g})",
        }
    return check | {
        "passed": True,
        "reason": f"accuracy {candidate.correct}/{candidate.labelled} not worse",
    }


# -- the events a decision publishes ---------------------------------------------------------


def next_step(traffic: ModelTraffic, decision: Decision, actor: str, cause: str) -> ModelTraffic:
    """The traffic event after a passed step: the next step's weights, or, at 100%, the
    rollout completed."""
    step = traffic.step + 1
    weight = traffic.steps[step] if step < len(traffic.steps) else 100
    done = weight >= 100
    return traffic.model_copy(
        update={
            "status": "completed" if done else "advanced",
            "step": min(step, max(len(traffic.steps) - 1, 0)),
            "weights": (
                {traffic.candidate: 100}
                if done
                else {traffic.stable: 100 - weight, traffic.candidate: weight}
            ),
            "analysis": decision.analysis,
            "reason": decision.reason,
            "actor": actor,
            "cause": cause,
        }
    )


def aborted(
    traffic: ModelTraffic,
    *,
    reason: str,
    actor: str,
    analysis: dict[str, JsonValue] | None = None,
    cause: str | None = None,
) -> ModelTraffic:
    """The traffic event that ends a rollout with all weight back on the stable version."""
    return traffic.model_copy(
        update={
            "status": "aborted",
            "weights": {traffic.stable: 100},
            "shadow": False,
            "analysis": analysis or {},
            "reason": reason,
            "actor": actor,
            "cause": cause,
        }
    )


def completed(
    traffic: ModelTraffic, *, reason: str, actor: str, cause: str | None = None
) -> ModelTraffic:
    """The traffic event that ends a rollout with all weight on the candidate (by hand)."""
    return traffic.model_copy(
        update={
            "status": "completed",
            "weights": {traffic.candidate: 100},
            "shadow": False,
            "analysis": {},
            "reason": reason,
            "actor": actor,
            "cause": cause,
        }
    )


def promotion(done: ModelTraffic, ended_by: str) -> ModelPromoted:
    """The `model.promoted` of a completed rollout's candidate, with the rollout's evidence
    (`ended_by`: the id of the completing traffic event)."""
    return ModelPromoted(
        model=done.model,
        version=done.candidate,
        run_id=done.run_id,
        previous_version=done.stable,
        reason=f"{done.strategy} rollout {done.rollout_id} completed: {done.reason}",
        actor=done.actor,
        policy=done.policy,
        evidence={
            "rollout": done.rollout_id,
            "strategy": done.strategy,
            "steps": list(done.steps),
            "traffic_event": ended_by,
            "analysis": done.analysis,
        },
        cause=ended_by,
        artifact=done.artifact,
        dataset=done.dataset,
    )

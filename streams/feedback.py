"""Online accuracy from delayed labels: `inference.feedback` (a request's true label or value)
joined with `inference.logged` by request id, into per-version windows of accuracy
(classification) or RMSE (regression) published to `serving.accuracy`, and alert rules on
them (`accuracy`, `rmse`) published to `serving.alert` with the same evidence as the serving
metrics' rules (streams/alerts.py), so that a rollback can compare versions on labels.

Join: a logged prediction waits for its feedback up to twice `feedback_horizon_seconds` of
event time; feedback known later than the horizon after its prediction counts `late`, and
feedback whose window has already closed counts `late` in that version's next window.
Feedback that arrives before its prediction waits for the inference log to pass it; feedback
whose request id is not in the inference log (unknown, never sampled, or forgotten) counts
`unmatched`; a label whose type does not fit the prediction counts `mismatched`; feedback for
a request already labelled counts `duplicates` (the first one counts). Nothing is dropped
without being counted. A feedback label is compared with a request of one row.

Windows are tumbling by the feedback's event time and close when both topics' stream time
of the model (the largest event time read; both are keyed by the model) has passed their
end + grace, or, once the log is read to its
end, when the wall clock has (nothing older is coming). Reads inference.logged and
inference.feedback with a group-less log view from the beginning (the state is the fold of
the log, rebuilt the same at every start); writes serving.accuracy and serving.alert with
ids derived from the window, skipping ids already in the log.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import JsonValue

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView, Positioned
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.serving import InferenceFeedback, InferenceLogged, ServingAccuracy
from mlbus.settings import StreamsSettings
from mlbus.stats import wilson
from mlbus.streams.alerts import HISTORY, Thresholds, Verdict, advance
from mlbus.streams.windows import Output, event_id

log = logging.getLogger(__name__)

READS = ("inference.logged", "inference.feedback")
WRITES = ("serving.accuracy", "serving.alert")
#: Version of feedback that matched no logged prediction and names none.
UNKNOWN = "unknown"
#: Prefix of a shadow candidate's prediction among the pending ones (its request id is the
#: answered request's; a NUL never starts an id a client sends in JSON text it means).
SHADOW = "\x00shadow\x00"
_NEVER = -(2**62)


@dataclass(frozen=True)
class FeedbackConfig:
    size_ms: int
    grace_ms: int
    horizon_ms: int
    max_pending: int
    thresholds: Thresholds

    @classmethod
    def from_settings(cls, s: StreamsSettings) -> FeedbackConfig:
        return cls(
            size_ms=round(s.window_seconds * 1000),
            grace_ms=round(s.grace_seconds * 1000),
            horizon_ms=round(s.feedback_horizon_seconds * 1000),
            max_pending=s.feedback_max_pending,
            thresholds=Thresholds.from_settings(s),
        )


@dataclass
class Prediction:
    model: str
    version: str
    time_ms: int
    value: float | int | str | None  # None: a request of several rows, or no prediction
    joined: bool = False  # its first feedback was counted; later ones are duplicates
    #: the first feedback joined with it, for a shadow's answer to the same request that is
    #: read after it
    feedback: tuple[InferenceFeedback, int] | None = None


@dataclass
class Window:
    start: int
    end: int
    labelled: int = 0
    correct: int = 0
    numeric: int = 0  # labels compared as values (regression)
    sq_error: float = 0.0
    late: int = 0
    unmatched: int = 0
    mismatched: int = 0
    duplicates: int = 0


@dataclass
class VersionState:
    windows: dict[int, Window] = field(default_factory=dict)
    closed_until: int = _NEVER
    carry_late: int = 0  # feedback for closed windows, counted in the next one
    alerts: dict[str, Any] = field(default_factory=dict)


def compare(prediction: float | int | str | None, label: float | int | str | bool) -> Any:
    """(correct, squared error) of a label against a logged prediction; None when the label
    does not fit it. A float prediction is a regression value; an int or str a class."""
    if prediction is None:
        return None
    if isinstance(label, bool):
        label = int(label)
    if isinstance(prediction, float) and not isinstance(label, str):
        error = float(label) - prediction
        return abs(error) < 1e-9, error * error
    if isinstance(label, float):
        if not label.is_integer():
            return None
        label = int(label)
    return str(label) == str(prediction), None


class FeedbackJoin:
    """The join's state and its outputs (`outbox`); `apply` events in log order per topic."""

    def __init__(self, config: FeedbackConfig) -> None:
        self.config = config
        self.pending: OrderedDict[str, Prediction] = OrderedDict()
        #: model → request id → feedback waiting for its prediction, in arrival order
        self.orphans: dict[str, OrderedDict[str, list[tuple[InferenceFeedback, int]]]] = {}
        self.versions: dict[tuple[str, str], VersionState] = {}
        #: topic → model → stream time. Per model: both topics are keyed by the model, so a
        #: model's records are in order on each, whichever partitioner a producer used.
        self.watermarks: dict[str, dict[str, int]] = {topic: {} for topic in READS}
        self.outbox: list[Output] = []
        self.forgotten = 0  # predictions dropped for `max_pending` before their horizon

    # -- input -------------------------------------------------------------------------------

    def apply(self, topic: str, data: Any, time_ms: int) -> None:
        if isinstance(data, InferenceLogged):
            self._logged(data, time_ms)
        elif isinstance(data, InferenceFeedback):
            self._feedback(data, time_ms)
        else:
            return
        marks = self.watermarks[topic]
        if time_ms > marks.get(data.model, _NEVER):
            marks[data.model] = time_ms
            self._close(data.model)

    def _logged(self, data: InferenceLogged, time_ms: int) -> None:
        if not data.ok:
            return  # nothing was answered: no label can be right or wrong
        value = data.predictions[0] if len(data.predictions) == 1 else None
        prediction = Prediction(data.model, data.version, time_ms, value)
        # A shadow candidate's answer to the same request is joined too, under its own
        # version (online accuracy of both, on the same labels), beside the answer returned.
        key = SHADOW + data.request_id if data.shadow else data.request_id
        self.pending[key] = prediction
        self.pending.move_to_end(key)
        orphans = self.orphans.get(data.model)
        if data.shadow:  # the returned answer's record takes the orphans; a shadow joins them
            answered = self.pending.get(data.request_id)
            if answered is not None and answered.feedback is not None:
                self._join(prediction, *answered.feedback)
            for waiting in orphans.get(data.request_id, ()) if orphans else ():
                self._join(prediction, *waiting)
        else:
            for waiting in orphans.pop(data.request_id, ()) if orphans else ():
                self._join(prediction, *waiting)
        self._evict(time_ms)

    def _feedback(self, data: InferenceFeedback, time_ms: int) -> None:
        shadow = self.pending.get(SHADOW + data.request_id)
        if shadow is not None:
            self._join(shadow, data, time_ms)
        prediction = self.pending.get(data.request_id)
        if prediction is None:
            waiting = self.orphans.setdefault(data.model, OrderedDict())
            waiting.setdefault(data.request_id, []).append((data, time_ms))
            return
        self._join(prediction, data, time_ms)

    def _join(self, prediction: Prediction, data: InferenceFeedback, time_ms: int) -> None:
        window = self._window(data.model, prediction.version, time_ms)
        if window is None:
            return
        if prediction.joined:  # a client's retry, or a second opinion: counted once
            window.duplicates += 1
            return
        prediction.joined = True
        prediction.feedback = (data, time_ms)
        known = round(data.known_at.timestamp() * 1000) if data.known_at is not None else time_ms
        if known - prediction.time_ms > self.config.horizon_ms:
            window.late += 1
            return
        outcome = compare(prediction.value, data.label)
        if outcome is None:
            window.mismatched += 1
            return
        correct, squared = outcome
        window.labelled += 1
        window.correct += bool(correct)
        if squared is not None:
            window.numeric += 1
            window.sq_error += squared

    def _window(self, model: str, version: str, time_ms: int) -> Window | None:
        """The open window of `time_ms`, or None (counted late) when it has closed."""
        state = self.versions.setdefault((model, version), VersionState())
        start = time_ms - time_ms % self.config.size_ms
        if start + self.config.size_ms <= state.closed_until:
            state.carry_late += 1
            return None
        window = state.windows.get(start)
        if window is None:
            window = state.windows[start] = Window(start, start + self.config.size_ms)
        return window

    def _evict(self, now_ms: int) -> None:
        """Forget predictions past twice the horizon (their feedback is late by then anyway),
        and the oldest beyond `max_pending`."""
        oldest = now_ms - 2 * self.config.horizon_ms
        pending = self.pending
        while pending:
            _, p = next(iter(pending.items()))
            if p.time_ms >= oldest and len(pending) <= self.config.max_pending:
                break
            pending.popitem(last=False)
            if p.time_ms >= oldest:
                self.forgotten += 1

    # -- closing -----------------------------------------------------------------------------

    def idle(self, now_ms: int) -> None:
        """The log has been read to its end: the wall clock stands in for stream time."""
        for model in {m for m, _ in self.versions} | set(self.orphans):
            self._close(model, now_ms - self.config.grace_ms)

    def _close(self, model: str, idle: int = _NEVER) -> None:
        """Close the model's windows that both topics' stream time (or `idle`) has passed."""
        grace = self.config.grace_ms
        logged = self.watermarks["inference.logged"].get(model, _NEVER) - grace
        labels = self.watermarks["inference.feedback"].get(model, _NEVER) - grace
        limit = max(min(logged, labels), idle)
        # Feedback still without its prediction once the model's inference log has passed it
        # (plus grace) matched nothing: counted in its window, under the version it names.
        orphans = self.orphans.get(model)
        while orphans:
            _, waiting = next(iter(orphans.items()))
            if waiting[0][1] > max(logged, idle):
                break
            orphans.popitem(last=False)
            for data, t in waiting:
                window = self._window(data.model, data.version or UNKNOWN, t)
                if window is not None:
                    window.unmatched += 1
        for (m, version), state in list(self.versions.items()):
            if m != model:
                continue
            for start in sorted(s for s, w in state.windows.items() if w.end <= limit):
                self._emit(model, version, state, state.windows.pop(start))

    def _emit(self, model: str, version: str, state: VersionState, w: Window) -> None:
        state.closed_until = max(state.closed_until, w.end)
        late, state.carry_late = w.late + state.carry_late, 0
        classified = w.labelled - w.numeric
        accuracy = w.correct / w.labelled if w.labelled and not w.numeric else None
        rmse = math.sqrt(w.sq_error / w.numeric) if w.numeric else None
        payload = ServingAccuracy(
            model=model,
            version=version,
            window_start=_ts(w.start),
            window_end=_ts(w.end),
            labelled=w.labelled,
            correct=w.correct,
            accuracy=accuracy,
            rmse=rmse,
            late=late,
            unmatched=w.unmatched,
            mismatched=w.mismatched,
            duplicates=w.duplicates,
        )
        self.outbox.append((payload, event_id("accuracy", model, version, w.start), _ts(w.end)))
        t = self.config.thresholds
        entries = state.alerts.setdefault(HISTORY, [])
        if w.labelled:
            entries.append([w.end, classified, classified - w.correct, w.numeric, w.sq_error])
            del entries[: -t.history]
        siblings = {
            v: s.alerts
            for (m, v), s in sorted(self.versions.items())
            if m == model and v != version
        }
        verdicts = judge(w, t)
        for alert in advance(
            state.alerts,
            verdicts,
            model,
            version,
            _ts(w.end),
            t,
            lambda rule: {
                v: found
                for v, s in siblings.items()
                if (found := summary(s.get(HISTORY, []), rule)) is not None
            },
        ):
            eid = event_id("alert", model, version, alert.alert, alert.status, w.end)
            self.outbox.append((alert, eid, _ts(w.end)))


def judge(w: Window, t: Thresholds) -> dict[str, Verdict]:
    """The accuracy rule (classification) and the RMSE rule (regression, when set) on one
    window with at least `min_samples` labels."""
    out: dict[str, Verdict] = {}
    classified = w.labelled - w.numeric
    if classified >= t.min_samples and not w.numeric:
        low, high = wilson(w.correct, classified, t.confidence)
        out["accuracy"] = Verdict(
            "accuracy",
            w.correct / classified,
            t.min_accuracy,
            high < t.min_accuracy,
            classified,
            {
                "n": classified,
                "labelled": classified,
                "wrong": classified - w.correct,
                "lower": round(low, 6),
                "upper": round(high, 6),
            },
            test=f"upper bound of the Wilson interval at {t.confidence} below the threshold",
        )
    if t.max_rmse is not None and w.numeric >= t.min_samples:
        rmse = math.sqrt(w.sq_error / w.numeric)
        out["rmse"] = Verdict(
            "rmse",
            rmse,
            t.max_rmse,
            rmse > t.max_rmse,
            w.numeric,
            {"n": w.numeric, "labelled": w.numeric, "sq_error": w.sq_error},
            test="RMSE of the window above the threshold",
        )
    return out


def summary(entries: Sequence[Sequence[Any]], rule: str) -> dict[str, JsonValue] | None:
    """A version's labelled history on one rule, as evidence (entries: end ms, classified,
    wrong, numeric, squared error)."""
    if not entries:
        return None
    span: dict[str, JsonValue] = {
        "windows": len(entries),
        "from": _ts(entries[0][0]).isoformat(),
        "to": _ts(entries[-1][0]).isoformat(),
    }
    if rule == "accuracy":
        n = sum(e[1] for e in entries)
        k = sum(e[2] for e in entries)
        return span | {"n": n, "k": k, "accuracy": (n - k) / n} if n else None
    if rule == "rmse":
        n = sum(e[3] for e in entries)
        return span | {"n": n, "rmse": math.sqrt(sum(e[4] for e in entries) / n)} if n else None
    return None


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class FeedbackProcessor:
    """The join on the log: a view folding both topics into a `FeedbackJoin`, and a thread
    that closes idle windows and publishes the outputs (confirmed by the broker)."""

    TICK = 0.2

    def __init__(self, kafka: KafkaConfig, settings: StreamsSettings) -> None:
        self.kafka = kafka
        self.join = FeedbackJoin(FeedbackConfig.from_settings(settings))
        self.idle_ms = round((settings.window_seconds + settings.grace_seconds) * 1000)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.view = LogView(kafka, READS, on_event=self._fold, name="streams-feedback")
        self.published: set[str] = set()
        self.producer: EventProducer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _fold(self, item: Positioned) -> None:
        event = item.event
        at = event.time
        time_ms = round(at.timestamp() * 1000) if at is not None else round(time.time() * 1000)
        with self._lock:
            self.join.apply(item.topic, event.data, time_ms)
            self._last = time.monotonic()

    def start(self) -> FeedbackProcessor:
        with LogView(self.kafka, WRITES, name="streams-feedback-outputs") as done:
            self.published = {item.event.id for item in done.catch_up(timeout=60)}
        self.producer = EventProducer(self.kafka, source="mlbus/streams")
        self.view.start()
        self._thread = threading.Thread(target=self._run, name="streams-feedback", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.TICK):
            try:
                self.flush()
            except Exception:  # the broker is away: the outputs wait for the next tick
                log.exception("streams: publishing feedback windows failed; retrying")

    def flush(self) -> int:
        """Close idle windows, publish what is due; the number of events published."""
        with self._lock:
            if self.view.caught_up and time.monotonic() - self._last >= self.idle_ms / 1000:
                self.join.idle(round(time.time() * 1000))
            outbox, self.join.outbox = self.join.outbox, []
        assert self.producer is not None
        sent = 0
        try:
            for payload, eid, at in outbox:
                if eid in self.published:
                    continue
                self.producer.publish(payload, event_id=eid, time=at)
                sent += 1
            self.producer.flush()
        except Exception:
            with self._lock:  # not confirmed: published again (same ids) on the next tick
                self.join.outbox[:0] = outbox
            raise
        self.published.update(eid for _, eid, _ in outbox)
        return sent

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.view.stop()
        if self.producer is not None:
            try:
                self.flush()
            finally:
                self.producer.close(10)

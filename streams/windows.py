"""Event-time windows of serving metrics per model version: the aggregation engine the faust
agent drives (and that its tables persist). Pure Python and deterministic: what it emits
depends only on the order of records within each partition, so a replay from offset 0 gives
the same windows as the live run. Produces `serving.metrics` and `serving.alert` payloads.

Time: a record's event time is its CloudEvent `time`. Each partition has a watermark, the
largest event time seen on it (stream progress, not the wall clock). A tumbling window
[start, end) closes when the watermark passes end + grace; a record whose window has closed
(or would have) is late: counted, not aggregated. The hopping view (hopping_seconds long,
advancing by window_seconds) is the exact merge of the tumbling windows it covers, emitted
when its end passes the same bound. The last window of a stream that stops closes when the
partition has been idle (no record) for `idle_ms` of wall-clock time: the watermark then
moves to the wall clock (`idle()`), i.e. "nothing older is coming". That is the one
wall-clock input; it only matters to a record that arrives after its window was closed
that way (counted late live, aggregated in a replay that reads it without the pause).
"""

from __future__ import annotations

import math
import uuid
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mlbus.errors import ConfigError
from mlbus.schemas.base import Payload
from mlbus.schemas.serving import Quantiles, ServingAlert, ServingMetrics
from mlbus.settings import StreamsSettings
from mlbus.streams import sketch
from mlbus.streams.alerts import Drift, Thresholds, evaluate
from mlbus.streams.drift import CLASS_KEY, Baseline, Baselines, class_psi, psi

_MIN_LATENCY = sketch.MIN_VALUE
_INV_LOG_GAMMA = sketch.INV_LOG_GAMMA
_ceil, _log, _isfinite = math.ceil, math.log, math.isfinite
_NAMESPACE = uuid.UUID("6f1c2b1e-5a43-4c5e-9a55-3d1b0f0c7e10")
_NEVER = -(2**62)
_INF = 2**62


@dataclass(frozen=True)
class WindowConfig:
    size_ms: int
    hopping_ms: int
    grace_ms: int
    idle_ms: int
    thresholds: Thresholds

    @classmethod
    def from_settings(cls, s: StreamsSettings, idle_seconds: float | None = None) -> WindowConfig:
        size = round(s.window_seconds * 1000)
        hopping = round(s.hopping_seconds * 1000)
        if size <= 0 or hopping < size or hopping % size:
            raise ConfigError(
                f"streams.hopping_seconds ({s.hopping_seconds}) must be a multiple of "
                f"streams.window_seconds ({s.window_seconds}): the hopping view is built from "
                f"the tumbling windows"
            )
        grace = round(s.grace_seconds * 1000)
        idle = idle_seconds if idle_seconds is not None else s.window_seconds + s.grace_seconds
        return cls(
            size_ms=size,
            hopping_ms=hopping,
            grace_ms=grace,
            idle_ms=round(idle * 1000),
            thresholds=Thresholds.from_settings(s),
        )


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


_Binning = list[tuple[int, tuple[float, ...], list[int], int]]


def _binning(names: Sequence[str], baseline: Baseline, bins: dict[str, list[int]]) -> _Binning:
    """(input position, bin edges, counts to add to, last bin) for each input a record with
    these feature names contributes to a window's bins: the inputs named by the baseline
    that the window has counts for, in the order of the names."""
    out = []
    for j, name in enumerate(names):
        feature = baseline.features.get(name)
        counts = bins.get(name)
        if feature is not None and counts is not None:
            out.append((j, feature.edges, counts, len(counts) - 1))
    return out


def event_id(*parts: object) -> str:
    """Deterministic id of an output: a replay or a redelivery publishes the same id, so
    consumers (idempotent by id) see one event."""
    return str(uuid.uuid5(_NAMESPACE, "|".join(map(str, parts))))


class Agg:
    """One window of one model version: counts, latency sketch, classes, input bins."""

    __slots__ = (
        "_plan",
        "agree_sum",
        "bins",
        "classes",
        "client_errors",
        "dataset",
        "end",
        "errors",
        "lat",
        "lat_max",
        "lat_sum",
        "n",
        "note",
        "shadowed",
        "start",
        "zero",
    )

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.n = 0
        self.errors = 0
        self.client_errors = 0
        self.lat: dict[int, int] = {}
        self.zero = 0
        self.lat_sum = 0.0
        self.lat_max = 0.0
        self.classes: dict[str, int] = {}
        self.bins: dict[str, list[int]] | None = None
        self.dataset: str | None = None
        self.note: str | None = None
        self.shadowed = 0  # a shadow's records that carry their agreement with the answer
        self.agree_sum = 0.0
        # How add() bins a record's inputs, for the (baseline, bins, feature names) it was
        # made for: rebuilt when any of them changes, so it never outlives what it reads.
        self._plan: tuple[Baseline, dict[str, list[int]], Sequence[str], _Binning] | None = None

    def use_baseline(self, baseline: Baseline | str) -> None:
        if isinstance(baseline, str):
            self.note = baseline
            return
        self.dataset = baseline.dataset
        self.bins = {name: [0] * len(f.expected) for name, f in baseline.features.items()}

    def add(self, data: Mapping[str, Any], baseline: Baseline | str) -> None:
        """One `inference.logged` payload, as the processor's decode gives it
        (streams/logged.py: the fields in its `READ` validated by the contract's rules;
        optional fields may be missing, and the contract's defaults apply)."""
        self.n += 1
        get = data.get
        if not get("ok", True):
            # A refusal of the client's input (4xx) is not the server's failure; a record
            # of an older server has no status, and its failure counts as the server's.
            status = get("status")
            if status is not None and 400 <= status < 500:
                self.client_errors += 1
            else:
                self.errors += 1
        latency = data["latency_seconds"]
        # sketch.bucket_of, inlined (once per record: the call was a visible share of apply)
        if latency <= _MIN_LATENCY:
            self.zero += 1
        else:
            index = _ceil(_log(latency) * _INV_LOG_GAMMA)
            lat = self.lat
            lat[index] = lat.get(index, 0) + 1
        self.lat_sum += latency
        if latency > self.lat_max:
            self.lat_max = latency
        agreement = get("agreement")
        if agreement is not None:
            self.shadowed += 1
            self.agree_sum += agreement
        predictions = get("predictions")
        if predictions:
            classes = self.classes
            for p in predictions:
                label = p if isinstance(p, str) else str(p)
                classes[label] = classes.get(label, 0) + 1
        bins = self.bins
        inputs = get("inputs")
        if bins is None or not inputs or isinstance(baseline, str):
            return
        names = get("feature_names") or baseline.positional
        plan = self._plan
        if plan is None or plan[0] is not baseline or plan[1] is not bins or plan[2] != names:
            plan = self._plan = (baseline, bins, names, _binning(names, baseline, bins))
        steps = plan[3]
        isfinite = _isfinite
        for sample in inputs:
            size = len(sample)
            for j, edges, counts, last in steps:
                if j < size:
                    x = sample[j]
                    if isfinite(x):
                        # FeatureBaseline.bin_of, inlined: the call was a large share of apply()
                        i = bisect_right(edges, x) - 1
                        counts[0 if i < 0 else (last if i > last else i)] += 1

    def merge(self, other: Agg) -> None:
        self.n += other.n
        self.errors += other.errors
        self.client_errors += other.client_errors
        sketch.merge_into(self.lat, other.lat)
        self.zero += other.zero
        self.lat_sum += other.lat_sum
        self.lat_max = max(self.lat_max, other.lat_max)
        self.shadowed += other.shadowed
        self.agree_sum += other.agree_sum
        for label, count in other.classes.items():
            self.classes[label] = self.classes.get(label, 0) + count
        if other.bins is not None and (self.dataset in (None, other.dataset)):
            self.dataset = other.dataset
            if self.bins is None:
                self.bins = {k: list(v) for k, v in other.bins.items()}
            else:
                for name, counts in other.bins.items():
                    mine = self.bins.setdefault(name, [0] * len(counts))
                    for i, c in enumerate(counts):
                        mine[i] += c
        if self.note is None:
            self.note = other.note

    def add_counts(self, other: Agg, sign: int) -> None:
        """Add (`sign` 1) or take away (-1) `other`'s counts: the integer parts of `merge`,
        which `_hopping_view` slides; keys whose count comes back to 0 are removed, so that
        the result holds what a `merge` of the remaining windows holds."""
        self.n += sign * other.n
        self.errors += sign * other.errors
        self.client_errors += sign * other.client_errors
        self.zero += sign * other.zero
        self.shadowed += sign * other.shadowed
        _add_counts(self.lat, other.lat, sign)
        _add_counts(self.classes, other.classes, sign)
        if self.bins is not None and other.bins is not None:
            for name, counts in other.bins.items():
                row = self.bins[name]
                for i, c in enumerate(counts):
                    row[i] += sign * c

    def metrics(
        self,
        model: str,
        version: str,
        kind: Literal["tumbling", "hopping"],
        baselines: Baselines,
        start: int | None = None,
    ) -> ServingMetrics:
        latency = None
        if self.n:
            q = sketch.quantiles(self.lat, self.zero, (0.5, 0.95, 0.99))
            latency = Quantiles(
                p50=q[0.5],
                p95=q[0.95],
                p99=q[0.99],
                mean=self.lat_sum / self.n,
                max=self.lat_max,
            )
        drift, note = self._drift(model, version, baselines)
        return ServingMetrics(
            model=model,
            version=version,
            window_start=_ts(self.start if start is None else start),
            window_end=_ts(self.end),
            window=kind,
            requests=self.n,
            errors=self.errors,
            error_rate=self.errors / valid if (valid := self.n - self.client_errors) else 0.0,
            client_errors=self.client_errors,
            latency_seconds=latency,
            class_distribution=dict(sorted(self.classes.items())),
            psi=drift,
            drift_note=note,
            shadowed=self.shadowed or None,
            agreement=min(1.0, self.agree_sum / self.shadowed) if self.shadowed else None,
        )

    def _drift(
        self, model: str, version: str, baselines: Baselines
    ) -> tuple[dict[str, float] | None, str | None]:
        if self.bins is None:
            return None, self.note or "no training baseline known when the window opened"
        baseline = baselines.resolve(model, version)
        if isinstance(baseline, str) or baseline.dataset != self.dataset:
            return None, f"training baseline changed during the window (was {self.dataset})"
        out = {}
        for name, counts in sorted(self.bins.items()):
            value = psi(baseline.features[name].expected, counts)
            if value is not None:
                out[name] = round(value, 6)
        if not out:
            return None, f"no inputs logged in this window (baseline {self.dataset})"
        predicted = class_psi(baseline, self.classes)
        if predicted is not None:
            out[CLASS_KEY] = round(predicted, 6)
        return out, None

    # -- the changelog form (JSON) -----------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "s": self.start,
            "e": self.end,
            "n": self.n,
            "x": self.errors,
            "cx": self.client_errors,
            "l": {str(k): v for k, v in self.lat.items()},
            "z": self.zero,
            "ls": self.lat_sum,
            "lm": self.lat_max,
            "c": self.classes,
            "b": self.bins,
            "d": self.dataset,
            "note": self.note,
            "sh": self.shadowed,
            "ag": self.agree_sum,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Agg:
        agg = cls(raw["s"], raw["e"])
        agg.n, agg.errors, agg.zero = raw["n"], raw["x"], raw["z"]
        agg.client_errors = raw.get("cx", 0)  # absent in state written before it was counted
        agg.lat = {int(k): v for k, v in raw["l"].items()}
        agg.lat_sum, agg.lat_max = raw["ls"], raw["lm"]
        agg.classes, agg.bins = dict(raw["c"]), raw["b"]
        agg.dataset, agg.note = raw["d"], raw["note"]
        agg.shadowed, agg.agree_sum = raw.get("sh", 0), raw.get("ag", 0.0)  # absent: older state
        return agg


class Series:
    """Everything the engine keeps about one (model, version): one changelog record."""

    __slots__ = (
        "alerts",
        "closed_until",
        "hop_until",
        "hopping",
        "model",
        "offset",
        "open",
        "partition",
        "recent",
        "version",
    )

    def __init__(self, model: str, version: str, partition: int) -> None:
        self.model = model
        self.version = version
        self.partition = partition
        self.offset = -1  # last record applied: a redelivery after a restart is skipped
        self.open: dict[int, Agg] = {}
        self.recent: list[Agg] = []  # closed tumbling windows the hopping view still needs
        self.hop_until = _NEVER
        self.closed_until = _NEVER
        # The last hopping view merged and its members (in memory only: rebuilt by a full
        # merge after a restore), so that the next one adds and removes the windows that
        # differ instead of merging all of them again.
        self.hopping: tuple[list[Agg], Agg] | None = None
        self.alerts: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return f"{self.model}|{self.version}"

    def next_due(self, size: int, hopping: int) -> int:
        due = min((a.end for a in self.open.values()), default=_INF)
        for w in self.recent:
            first = max(w.end, self.hop_until + size)
            if first <= w.start + hopping:
                due = min(due, first)
        return due

    def to_json(self) -> dict[str, Any]:
        return {
            "m": self.model,
            "v": self.version,
            "p": self.partition,
            "o": self.offset,
            "open": [a.to_json() for a in self.open.values()],
            "recent": [a.to_json() for a in self.recent],
            "hu": self.hop_until,
            "cu": self.closed_until,
            "al": self.alerts,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Series:
        s = cls(raw["m"], raw["v"], raw["p"])
        s.offset, s.hop_until, s.closed_until = raw["o"], raw["hu"], raw["cu"]
        s.open = {a["s"]: Agg.from_json(a) for a in raw["open"]}
        s.recent = [Agg.from_json(a) for a in raw["recent"]]
        s.alerts = raw["al"]
        return s


Output = tuple[Payload, str, datetime]  # payload, deterministic event id, event time


class Engine:
    """Applies inference records in partition order; collects outputs in `outbox` and the
    keys whose state changed in `dirty_series` / `dirty_partitions` for the caller to
    persist and publish (faust agent) or drop (benchmarks)."""

    def __init__(
        self,
        config: WindowConfig,
        baselines: Baselines,
        *,
        on_metrics: Callable[[ServingMetrics], None] | None = None,
        on_alert: Callable[[ServingAlert], None] | None = None,
        on_late: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.baselines = baselines
        self.on_metrics = on_metrics
        self.on_alert = on_alert
        self.on_late = on_late
        self.series: dict[tuple[str, str], Series] = {}
        self.by_partition: dict[int, dict[tuple[str, str], Series]] = {}
        self.watermarks: dict[int, int] = {}
        self.next_due: dict[int, int] = {}
        self.outbox: list[Output] = []
        self.dirty_series: set[tuple[str, str]] = set()
        self.dirty_partitions: set[int] = set()
        self.late = 0

    # -- state in and out ------------------------------------------------------------------

    def restore(self, partition: int, watermark: int | None, series: list[dict[str, Any]]) -> None:
        """Load a partition's persisted state (after a restart or a reassignment)."""
        if watermark is not None:
            self.watermarks[partition] = watermark
        for raw in series:
            s = Series.from_json(raw)
            self.series[(s.model, s.version)] = s
            self.by_partition.setdefault(partition, {})[(s.model, s.version)] = s
        self._recompute_due(partition)

    def forget(self, partition: int) -> None:
        """Drop a revoked partition's state (its new owner restores it from the table)."""
        for key in self.by_partition.pop(partition, {}):
            self.series.pop(key, None)
            self.dirty_series.discard(key)
        self.watermarks.pop(partition, None)
        self.next_due.pop(partition, None)
        self.dirty_partitions.discard(partition)

    # -- the stream ------------------------------------------------------------------------

    def apply(self, partition: int, offset: int, time_ms: int, data: Mapping[str, Any]) -> None:
        """One record: `data` is its `inference.logged` payload as the processor's decode
        gives it (streams/logged.py)."""
        key = (data["model"], data["version"])
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(key[0], key[1], partition)
            self.by_partition.setdefault(partition, {})[key] = s
        if offset <= s.offset and partition == s.partition:
            self.advance(partition, time_ms)  # applied before a restart: only stream time
            return
        s.offset = offset
        self.dirty_series.add(key)
        config = self.config
        size = config.size_ms
        start = time_ms - time_ms % size
        end = start + size
        watermarks = self.watermarks
        watermark = watermarks.get(partition, _NEVER)
        if end <= s.closed_until or end + config.grace_ms <= watermark:
            self.late += 1
            if self.on_late is not None:
                self.on_late(key[0], key[1])
        else:
            agg = s.open.get(start)
            baseline = self.baselines.resolve(key[0], key[1])
            if agg is None:
                agg = s.open[start] = Agg(start, end)
                agg.use_baseline(baseline)
                if end < self.next_due.get(partition, _INF):
                    self.next_due[partition] = end
            agg.add(data, baseline)
        # advance(partition, time_ms), inlined: nothing above moved the watermark
        if time_ms > watermark:
            watermarks[partition] = time_ms
            self.dirty_partitions.add(partition)
            if time_ms - config.grace_ms >= self.next_due.get(partition, _INF):
                self._close(partition)

    def advance(self, partition: int, time_ms: int) -> None:
        """Move a partition's stream time forward; close what that makes due."""
        if time_ms <= self.watermarks.get(partition, _NEVER):
            return
        self.watermarks[partition] = time_ms
        self.dirty_partitions.add(partition)
        if time_ms - self.config.grace_ms >= self.next_due.get(partition, _INF):
            self._close(partition)

    def idle(self, partition: int, now_ms: int) -> None:
        """The partition has been idle: the wall clock stands in for stream time."""
        if now_ms - self.config.grace_ms >= self.next_due.get(partition, _INF):
            self.advance(partition, now_ms)

    # -- closing ---------------------------------------------------------------------------

    def _recompute_due(self, partition: int) -> None:
        cfg = self.config
        self.next_due[partition] = min(
            (
                s.next_due(cfg.size_ms, cfg.hopping_ms)
                for s in self.by_partition.get(partition, {}).values()
            ),
            default=_INF,
        )

    def _close(self, partition: int) -> None:
        limit = self.watermarks[partition] - self.config.grace_ms
        for key, s in self.by_partition.get(partition, {}).items():
            if self._close_series(s, limit):
                self.dirty_series.add(key)
        self._recompute_due(partition)

    def _close_series(self, s: Series, limit: int) -> bool:
        cfg = self.config
        changed = False
        for start in sorted(start for start, a in s.open.items() if a.end <= limit):
            agg = s.open.pop(start)
            metrics = agg.metrics(s.model, s.version, "tumbling", self.baselines)
            self._emit(
                metrics, event_id("metrics", s.model, s.version, "tumbling", agg.start), agg.end
            )
            if self.on_metrics is not None:
                self.on_metrics(metrics)
            for alert in evaluate(
                s.alerts,
                metrics,
                cfg.thresholds,
                drift=self._drift_of(s, agg),
                siblings={
                    o.version: o.alerts
                    for o in self.by_partition.get(s.partition, {}).values()
                    if o.model == s.model and o is not s
                },
            ):
                self._emit(
                    alert,
                    event_id("alert", s.model, s.version, alert.alert, alert.status, agg.end),
                    agg.end,
                )
                if self.on_alert is not None:
                    self.on_alert(alert)
            s.closed_until = max(s.closed_until, agg.end)
            s.recent.append(agg)
            changed = True
        if not s.recent:
            return changed
        size, hopping = cfg.size_ms, cfg.hopping_ms
        hop_limit = limit - limit % size
        if hop_limit <= s.hop_until:
            return changed
        boundaries = sorted(
            {
                b
                for w in s.recent
                for b in range(w.end, w.start + hopping + 1, size)
                if s.hop_until < b <= hop_limit
            }
        )
        for b in boundaries:
            members = [w for w in s.recent if w.start >= b - hopping and w.end <= b]
            if not members:
                continue
            merged = _hopping_view(s, members, b - hopping, b)
            metrics = merged.metrics(s.model, s.version, "hopping", self.baselines)
            self._emit(metrics, event_id("metrics", s.model, s.version, "hopping", b - hopping), b)
        s.hop_until = hop_limit
        s.recent = [w for w in s.recent if w.start + hopping > s.hop_until]
        return True

    def _drift_of(self, s: Series, agg: Agg) -> Drift | None:
        """What the psi rule needs of a closed window: its baseline and binned rows."""
        if agg.bins is None or agg.dataset is None:
            return None
        baseline = self.baselines.resolve(s.model, s.version)
        if isinstance(baseline, str) or baseline.dataset != agg.dataset:
            return None
        rows = max((sum(counts) for counts in agg.bins.values()), default=0)
        expected = tuple(baseline.features[name].expected for name in sorted(agg.bins))
        return Drift(agg.dataset, expected, rows)

    def _emit(self, payload: Payload, eid: str, at_ms: int) -> None:
        self.outbox.append((payload, eid, _ts(at_ms)))


def _add_counts(mine: dict[Any, int], theirs: Mapping[Any, int], sign: int) -> None:
    for key, count in theirs.items():
        total = mine.get(key, 0) + sign * count
        if total:
            mine[key] = total
        else:
            mine.pop(key, None)


def _hopping_view(s: Series, members: list[Agg], start: int, end: int) -> Agg:
    """The merge of `members` (closed tumbling windows, in order) as one hopping window.
    Where the series' last view had the same kind of members (every one with bins for one
    dataset, over the same features: then `merge` is a plain sum), it is slid: the windows
    that left are taken away, those that came added. The float sums are added again from
    the members in order, as `merge` adds them, so the figures are the same to the bit."""
    previous = s.hopping
    if previous is not None and _summable(previous[1], members):
        old, merged = previous
        kept = {id(w) for w in members}
        gone = [w for w in old if id(w) not in kept]
        had = {id(w) for w in old}
        new = [w for w in members if id(w) not in had]
        if [w for w in old if id(w) in kept] == [w for w in members if id(w) in had]:
            for w in gone:
                merged.add_counts(w, -1)
            for w in new:
                merged.add_counts(w, 1)
            merged.start, merged.end = start, end
            merged.lat_sum = merged.agree_sum = 0.0
            merged.lat_max = 0.0
            for w in members:
                merged.lat_sum += w.lat_sum
                merged.lat_max = max(merged.lat_max, w.lat_max)
                merged.agree_sum += w.agree_sum
            s.hopping = (members, merged)
            return merged
    merged = Agg(start, end)
    for w in members:
        merged.merge(w)
    s.hopping = (members, merged) if _summable(merged, members) else None
    return merged


def _summable(merged: Agg, members: list[Agg]) -> bool:
    """Every member has bins of `merged`'s dataset over `merged`'s features and no note:
    what `merge` then does is a sum."""
    bins, dataset = merged.bins, merged.dataset
    if bins is None or dataset is None or merged.note is not None:
        return False
    return all(
        w.bins is not None
        and w.dataset == dataset
        and w.note is None
        and w.bins.keys() == bins.keys()
        for w in members
    )

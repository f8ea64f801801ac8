"""The window engine without a broker: quantile accuracy, and results that depend only on
record order (batching, a state round trip through the changelog form, redelivery)."""

from __future__ import annotations

import json
import random

from mlbus.schemas.codec import wrap
from mlbus.settings import StreamsSettings
from mlbus.streams import sketch, windows
from mlbus.streams.drift import Baselines
from mlbus.streams.windows import Engine, WindowConfig
from tests.streams.support import BASE_MS, baseline_events, history, lower_quantile

NOW_MS = BASE_MS + 10**9  # a wall clock far after every event time


def engine() -> Engine:
    baselines = Baselines()
    for payload in baseline_events():
        baselines.add(wrap(payload, source="tests"))
    settings = StreamsSettings(window_seconds=1, hopping_seconds=3, grace_seconds=0.5)
    return Engine(WindowConfig.from_settings(settings, 5), baselines)


def outputs(e: Engine) -> list[str]:
    return sorted(
        json.dumps([eid, payload.model_dump(mode="json"), at.isoformat()])
        for payload, eid, at in e.outbox
    )


def test_quantiles_are_within_half_a_percent_whatever_the_range():
    rng = random.Random(1)
    for scale in (0.01, 0.05, 30.0):  # all above sketch.MIN_VALUE (1 µs)
        values = [rng.lognormvariate(0, 1.5) * scale for _ in range(5000)]
        buckets: dict[int, int] = {}
        zero = 0
        for v in values:
            index = sketch.bucket_of(v)
            if index is None:
                zero += 1
            else:
                buckets[index] = buckets.get(index, 0) + 1
        got = sketch.quantiles(buckets, zero, (0.01, 0.5, 0.95, 0.99, 1.0))
        for q, estimate in got.items():
            true = lower_quantile(values, q)
            assert abs(estimate - true) <= sketch.ALPHA * true * 1.0001, (scale, q)


def test_results_depend_only_on_record_order_not_on_batches_or_restarts():
    h = history(total=2800, windows=14)
    whole = engine()
    for offset, (payload, t) in enumerate(h.payloads):
        whole.apply(0, offset, t, payload.model_dump())
    whole.idle(0, NOW_MS)

    # the same records in odd batches, the state saved to its changelog form and restored
    # into a new engine after each, and every batch's last 5 records delivered twice
    pieces = engine()
    offset, saved, late = 0, None, 0
    rng = random.Random(3)
    while offset < len(h.payloads):
        n = rng.randint(1, 400)
        batch = list(enumerate(h.payloads[offset : offset + n], start=offset))
        fresh = engine()
        if saved is not None:
            fresh.restore(0, saved[0], [json.loads(json.dumps(s)) for s in saved[1]])
        fresh.outbox = pieces.outbox
        late += pieces.late
        pieces = fresh
        redelivered = batch[:5] if offset else []
        for i, (payload, t) in [*redelivered, *batch]:
            pieces.apply(0, i, t, payload.model_dump())
        saved = (pieces.watermarks[0], [s.to_json() for s in pieces.series.values()])
        offset += n
    pieces.idle(0, NOW_MS)
    assert outputs(pieces) == outputs(whole)
    assert late + pieces.late == whole.late == 1


def test_hopping_view_is_the_merge_of_the_tumbling_windows_it_covers():
    h = history(total=2000, windows=6)
    e = engine()
    for offset, (payload, t) in enumerate(h.payloads):
        e.apply(0, offset, t, payload.model_dump())
    e.idle(0, NOW_MS)
    tumbling = {
        (p.model, p.version, p.window_start): p
        for p, _, _ in e.outbox
        if getattr(p, "window", None) == "tumbling"
    }
    for p, _, _ in e.outbox:
        if getattr(p, "window", None) != "hopping":
            continue
        series = (p.model, p.version)
        covered = [
            t
            for (m, v, start), t in tumbling.items()
            if (m, v) == series and p.window_start <= start < p.window_end
        ]
        assert p.requests == sum(t.requests for t in covered)
        assert p.latency_seconds.max == max(t.latency_seconds.max for t in covered)


def test_hopping_must_be_a_multiple_of_the_window():
    import pytest

    from mlbus.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple"):
        WindowConfig.from_settings(StreamsSettings(window_seconds=10, hopping_seconds=25))


def test_a_shadows_windows_carry_its_agreement_with_the_answers_returned():
    from mlbus.streams.windows import Agg

    e = engine()
    for i in range(40):
        shadow = {"shadow": True, "answered_by": "v1", "agreement": 1.0 if i % 4 else 0.0}
        for version, extra in (("v1", {}), ("v2", shadow)):
            data = {"request_id": f"r{i}", "model": "plain", "version": version,
                    "replica": "r", "latency_seconds": 0.01, **extra}  # fmt: skip
            e.apply(0, 2 * i + (version == "v2"), BASE_MS + i * 10, data)
    e.idle(0, NOW_MS)
    tumbling = {p.version: p for p, _, _ in e.outbox if getattr(p, "window", None) == "tumbling"}
    assert (tumbling["v2"].shadowed, tumbling["v2"].agreement) == (40, 0.75)
    assert (tumbling["v1"].shadowed, tumbling["v1"].agreement) == (None, None)
    hopping = [p for p, _, _ in e.outbox if getattr(p, "window", None) == "hopping"]
    assert any(p.version == "v2" and p.agreement == 0.75 for p in hopping)  # merged too
    agg = Agg(0, 1000)
    agg.add({"latency_seconds": 0.01, "agreement": 0.5}, "no baseline")
    again = Agg.from_json(agg.to_json())
    assert (again.shadowed, again.agree_sum) == (1, 0.5)


def test_the_slid_hopping_view_is_the_full_merge_to_the_bit(monkeypatch):
    """Each hopping view after the first takes away the windows that left and adds the new
    ones (windows._hopping_view): the same figures, float sums included, as merging all of
    its windows again."""
    h = history(total=6000, windows=16)

    def run() -> list[str]:
        e = engine()
        for offset, (payload, t) in enumerate(h.payloads):
            e.apply(0, offset, t, payload.model_dump())
        e.idle(0, NOW_MS)
        return outputs(e)

    slid_calls = []
    add_counts = windows.Agg.add_counts
    monkeypatch.setattr(
        windows.Agg, "add_counts", lambda self, o, s: slid_calls.append(s) or add_counts(self, o, s)
    )
    slid = run()
    assert slid_calls.count(-1) > 10  # windows left views that were slid, not merged again
    monkeypatch.setattr(windows, "_summable", lambda *_: False)  # every view merged in full
    assert run() == slid
    assert any('"hopping"' in line for line in slid)

"""`mlbus streams` and log identity on the session broker: a restart on the same log finds
its anchors and counts nothing twice; a recreated `inference.logged` under a surviving
changelog stops the app with `NewLog` (the default), or is folded from offset 0
(`MLBUS_POSITIONS__ON_NEW_LOG=restart`) instead of being skipped below the old offsets."""

from __future__ import annotations

import time
from dataclasses import replace

from mlbus.kafka.admin import apply_topics
from tests.conftest import unique
from tests.mlbus.kafka.support import read_events, wait_until
from tests.streams.support import BASE_MS, Expected, History, encoded, history
from tests.streams.test_streams import (
    IDLE,
    check_windows,
    finish_exactly,
    produce,
    sample,
    started,
    tumbling,
)
from tests.streams.test_streams import (
    unique as unique_events,
)


def later(h: History, ms: int) -> History:
    """`h` with every event time `ms` (whole windows) later."""
    x = Expected(late=h.expected.late, shifted_windows=set(h.expected.shifted_windows))
    for name in ("requests", "errors", "latencies", "classes"):
        moved = {(m, v, t + ms): n for (m, v, t), n in getattr(h.expected, name).items()}
        getattr(x, name).update(moved)
    return History([(p, t + ms) for p, t in h.payloads], x, h.window_ms, h.windows)


def test_a_recreated_log_stops_the_app_or_is_folded_from_offset_0(kafka, run_streams, streams_env):
    h = history(total=600, windows=3, shift=range(99, 100))
    records = encoded(h)
    app_id = kafka.topic_prefix + "relog"
    first = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    started(first)
    produce(kafka, records[:250])
    wait_until(
        lambda: sample(first.scrape(), "mlbus_streams_records_total") == 250,
        lambda: f"the first records consumed\n{first.log()}",
        timeout=60,
    )
    assert first.stop() == 0, first.log()

    # a restart on the same log: its anchors are found, nothing is counted twice
    second = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    started(second)
    produce(kafka, records[250:])
    finish_exactly(kafka, h, second, "after a restart on the same log")
    assert "new log" not in second.log()

    # inference.logged recreated: the same app id (group and changelog) on a new, shorter
    # log. Kafka drops a deleted topic's committed offsets; a topic under a fresh prefix
    # has none either.
    relog = replace(kafka, topic_prefix=unique("t") + ".")
    apply_topics(relog)
    # The old log's last windows were closed on the wall clock (idle), which moved its
    # stream time there: the new log's records are written after it, as a live one's are.
    now = int(time.time()) * 1000
    h2 = later(history(total=400, windows=2, seed=8, shift=range(99, 100)), now - BASE_MS)
    produce(relog, encoded(h2))
    streams_env["MLBUS_TOPIC_PREFIX"] = relog.topic_prefix

    failing = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    wait_until(lambda: not failing.running(), lambda: f"the app to stop\n{failing.log()}", 90)
    assert failing.stop() != 0
    text = failing.log()
    assert "inference.logged/" in text and "is a new log" in text, text
    assert "MLBUS_POSITIONS__ON_NEW_LOG=restart" in text, text
    assert read_events(relog, "serving.metrics") == []

    streams_env["MLBUS_POSITIONS__ON_NEW_LOG"] = "restart"
    third = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    started(third)
    expected_windows = len(h2.expected.requests)
    done = wait_until(
        lambda: (lambda e: e if len(tumbling(e)) >= expected_windows else None)(
            unique_events(read_events(relog, "serving.metrics"))
        ),
        lambda: f"the new log's windows\n{third.log()}\n{third.scrape()}",
        timeout=120,
    )
    check_windows(h2, tumbling(done))
    # the old log's windows were all closed before: what this process exports is the new log
    page = third.scrape()
    for model, version in (("clf", "v1"), ("clf", "v2"), ("plain", "v1")):
        total = sum(n for k, n in h2.expected.requests.items() if k[:2] == (model, version))
        got = sample(page, "mlbus_serving_logged_requests_total", model=model, version=version)
        assert got == total, (model, version, got, total)
    assert third.stop() == 0, third.log()
    assert "is a new log" in third.log()

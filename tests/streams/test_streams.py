"""`mlbus streams` end to end on the session broker: 10,000 inference records with known
figures → serving.metrics, serving.alert, dead letters and the Prometheus page; the same log
replayed from offset 0 by a fresh app gives identical windows; a killed app recovers its
tables from the changelog and finishes the windows it had open."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime

import orjson
import pytest
from confluent_kafka import Producer

from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode
from mlbus.schemas.envelope import Event
from tests.mlbus.kafka.support import dead_letters, publish, read_events, wait_until
from tests.promtool import check_metrics
from tests.streams.conftest import StreamsProcess
from tests.streams.support import BASE_MS, History, baseline_events, encoded, history, promoted
from tests.streams.support import lower_quantile as lq

IDLE = "4"  # seconds without records before the last windows close (see streams.windows)


def produce(kafka: KafkaConfig, records: list[tuple[str, bytes]]) -> None:
    """With the kernel's producer settings, as the model server publishes: idempotent and
    lz4-compressed (which aiokafka reads only with cramjam installed)."""
    producer = Producer(kafka.producer())
    topic = kafka.topic("inference.logged")
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, headers=STRUCTURED_HEADERS)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(30) == 0


def sample(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page."""
    for line in page.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def started(app: StreamsProcess) -> None:
    wait_until(lambda: app.scrape() or not app.running(), "the metrics endpoint", timeout=60)
    assert app.running(), app.log()


def tumbling(events: list[Event]) -> dict[tuple[str, str, int], Event]:
    out = {}
    for e in events:
        d = e.data
        if d.window == "tumbling":
            out[(d.model, d.version, round(d.window_start.timestamp() * 1000))] = e
    return out


def unique(events: list[Event]) -> list[Event]:
    """Outputs have deterministic ids: a redelivery publishes the same event again."""
    return list({e.id: e for e in events}.values())


def check_windows(h: History, metrics: dict[tuple[str, str, int], Event]) -> None:
    x = h.expected
    assert set(metrics) == set(x.requests)
    for key, event in metrics.items():
        m = event.data
        assert (m.requests, m.errors) == (x.requests[key], x.errors[key]), key
        assert m.class_distribution == dict(x.classes[key]), key
        lat = x.latencies[key]
        for q, got in (
            (0.5, m.latency_seconds.p50),
            (0.95, m.latency_seconds.p95),
            (0.99, m.latency_seconds.p99),
        ):
            assert abs(got - lq(lat, q)) <= 0.01 * lq(lat, q), (key, q, got, lq(lat, q))
        assert m.latency_seconds.max == max(lat)
        assert m.latency_seconds.mean == pytest.approx(sum(lat) / len(lat), rel=1e-9)


def finish_exactly(kafka: KafkaConfig, h: History, app: StreamsProcess, when: str) -> None:
    """Wait for every window of `h` on serving.metrics, stop `app`, check them all exact."""
    expected_windows = len(h.expected.requests)
    done = wait_until(
        lambda: (lambda e: e if len(tumbling(e)) >= expected_windows else None)(
            unique(read_events(kafka, "serving.metrics"))
        ),
        lambda: f"all windows {when}\n{app.log()}",
        timeout=120,
    )
    assert app.stop() == 0, app.log()
    check_windows(h, tumbling(done))
    assert len(tumbling(done)) == expected_windows


def test_metrics_drift_alerts_prometheus_then_identical_replay(kafka, run_streams):
    publish(kafka, baseline_events())
    h = history()
    records = encoded(h)
    app = run_streams("--app-id", kafka.topic_prefix + "live", "--idle-seconds", IDLE)
    started(app)
    produce(kafka, records[:100])  # live: the app is consuming before the rest arrives
    wait_until(
        lambda: (sample(app.scrape(), "mlbus_streams_records_total") or 0) > 0,
        lambda: f"the app to consume\n{app.log()}",
        timeout=60,
    )
    bad = [
        ("clf", b"not json at all"),
        (
            "clf",
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": "x",
                    "source": "s",
                    "type": "inference.logged",
                    "data": {"model": "clf"},
                }
            ),
        ),
        ("clf", encode_wrong_type()),
    ]
    produce(kafka, records[100:3000] + bad + records[3000:])

    expected_windows = len(h.expected.requests)

    def outputs() -> list[Event] | None:
        events = read_events(kafka, "serving.metrics")
        return events if len(tumbling(events)) >= expected_windows else None

    live = wait_until(outputs, lambda: f"all windows closed\n{app.log()}", timeout=90)
    alerts = wait_until(lambda: read_events(kafka, "serving.alert"), "alerts")
    check_windows(h, tumbling(live))

    # drift: above the threshold exactly in the shifted windows of clf v2; none for `plain`
    for (model, version, start), event in tumbling(live).items():
        m = event.data
        w = (start - BASE_MS) // h.window_ms
        if model == "plain":
            assert m.psi is None and "no training baseline" in m.drift_note
            continue
        worst = max(v for k, v in m.psi.items() if k.startswith("f"))
        assert (worst > 0.2) == (version == "v2" and w in h.expected.shifted_windows), (
            model,
            version,
            w,
            m.psi,
        )
        assert m.psi["predicted_class"] < 0.2

    # the hopping view covers every record three times (3 s of 1 s windows)
    hop: dict[tuple[str, str], int] = defaultdict(int)
    for e in live:
        if e.data.window == "hopping":
            hop[(e.data.model, e.data.version)] += e.data.requests
    for series in hop:
        total = sum(n for k, n in h.expected.requests.items() if k[:2] == series)
        assert hop[series] == 3 * total

    # alerts: psi of clf v2 fires after 3 shifted windows and resolves when the shift ends;
    # plain v1 (20 % errors) fires on error rate and stays firing
    end = lambda w: datetime.fromtimestamp((BASE_MS + (w + 1) * h.window_ms) / 1000, UTC)  # noqa: E731
    got = sorted(
        (a.data.model, a.data.version, a.data.alert, a.data.status, a.data.window_end)
        for a in alerts
    )
    first, last = min(h.expected.shifted_windows), max(h.expected.shifted_windows)
    assert got == [
        ("clf", "v2", "psi", "firing", end(first + 2)),
        ("clf", "v2", "psi", "resolved", end(last + 1)),
        ("plain", "v1", "error_rate", "firing", end(2)),
    ]

    # Prometheus: the same figures, labelled by model and version
    page = app.scrape()
    for model, version in (("clf", "v1"), ("clf", "v2"), ("plain", "v1")):
        keys = [k for k in h.expected.requests if k[:2] == (model, version)]
        labels = {"model": model, "version": version}
        assert sample(page, "mlbus_serving_logged_requests_total", **labels) == sum(
            h.expected.requests[k] for k in keys
        )
        assert sample(page, "mlbus_serving_logged_errors_total", **labels) == sum(
            h.expected.errors[k] for k in keys
        )
        last_window = max(keys, key=lambda k: k[2])
        lat = h.expected.latencies[last_window]
        p99 = sample(page, "mlbus_serving_window_latency_seconds", q="0.99", **labels)
        assert abs(p99 - lq(lat, 0.99)) <= 0.01 * lq(lat, 0.99)
    assert sample(page, "mlbus_serving_late_events_total", model="clf", version="v1") == 1
    assert sample(page, "mlbus_serving_psi", model="clf", version="v2", feature="f0") < 0.2
    assert sample(page, "mlbus_serving_psi", model="plain", version="v1", feature="f0") is None
    assert (
        sample(page, "mlbus_serving_alert_firing", model="plain", version="v1", alert="error_rate")
        == 1
    )
    assert sample(page, "mlbus_streams_deadletters_total") == 3
    # Prometheus's own checker accepts the page; the app's lag is there, per partition, and
    # is 0: every record is processed and committed
    check_metrics(page)
    group, logged = kafka.topic_prefix + "live", kafka.topic("inference.logged")
    lags = [
        sample(page, "mlbus_consumer_lag", group=group, topic=logged, partition=str(p))
        for p in range(TOPICS["inference.logged"].partitions)
    ]
    assert {lag for lag in lags if lag is not None} == {0}, lags
    assert sample(page, "process_resident_memory_bytes") > 0
    # A third promotion of clf retires v1 (a model server keeps the last two): its series go
    publish(kafka, [promoted("v3", "r2", True)])
    wait_until(
        lambda: (
            'version="v1"'
            not in "".join(line for line in app.scrape().splitlines() if 'model="clf"' in line)
        ),
        lambda: f"clf v1's series to leave\n{app.scrape()}",
        timeout=30,
    )
    page = app.scrape()
    assert sample(page, "mlbus_serving_logged_requests_total", model="clf", version="v2")
    assert sample(page, "mlbus_serving_logged_requests_total", model="plain", version="v1")

    # malformed records: dead-lettered with their reason, the stream went on
    letters = dead_letters(kafka)
    assert len(letters) == 3
    assert {letter.data.consumer for letter in letters} == {"streams"}
    assert all(letter.data.original.topic == kafka.topic("inference.logged") for letter in letters)
    assert app.stop() == 0, app.log()

    # replay: a fresh app (new group, new tables) from offset 0 → the same windows, byte for
    # byte (ids and times are derived from the windows, not from when they were computed)
    replay = run_streams("--app-id", kafka.topic_prefix + "replay", "--idle-seconds", IDLE)
    started(replay)
    wait_until(
        lambda: len(read_events(kafka, "serving.metrics")) >= 2 * len(live),
        lambda: f"the replay's windows\n{replay.log()}",
        timeout=90,
    )
    assert replay.stop() == 0, replay.log()
    everything = read_events(kafka, "serving.metrics")
    assert len(everything) == 2 * len(live)
    assert sorted(encode(e) for e in everything) == sorted([encode(e) for e in live] * 2)
    assert len(read_events(kafka, "serving.alert")) == 2 * len(alerts)


def encode_wrong_type() -> bytes:
    """A valid CloudEvent of another type on inference.logged."""
    from mlbus.schemas.codec import encode_new

    _, value = encode_new(baseline_events()[0], source="tests")
    return value


def test_restart_recovers_tables_from_the_changelog(kafka, run_streams):
    publish(kafka, baseline_events())
    h = history(total=3000, windows=10, shift=range(20, 21))
    records = encoded(h)
    half = len(records) // 2 + 37  # in the middle of a window
    app_id = kafka.topic_prefix + "restart"
    first = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    started(first)
    produce(kafka, records[:half])
    wait_until(
        lambda: sample(first.scrape(), "mlbus_streams_records_total") == half,
        lambda: f"the first half consumed\n{first.log()}",
        timeout=60,
    )
    before = unique(read_events(kafka, "serving.metrics"))
    assert before, "some windows closed before the restart"
    first.kill()  # SIGKILL: no chance to commit or flush anything more

    second = run_streams("--app-id", app_id, "--idle-seconds", IDLE)
    started(second)
    produce(kafka, records[half:])
    # every window exact: the open ones were recovered, nothing was counted twice
    finish_exactly(kafka, h, second, "after the restart")


def test_two_workers_share_the_log_and_one_takes_over_when_the_other_dies(kafka, run_streams):
    """A group of two: the partitions are split, and when the busier one is SIGKILLed the
    survivor is given its partitions, recovers their tables from the changelog and finishes
    every window exactly (the batches it had in flight during the rebalance included)."""
    publish(kafka, baseline_events())
    h = history(total=3000, windows=10, shift=range(20, 21))
    records = encoded(h)
    half = len(records) // 2 + 11
    app_id = kafka.topic_prefix + "pair"
    workers = [run_streams("--app-id", app_id, "--idle-seconds", IDLE) for _ in range(2)]
    for worker in workers:
        started(worker)

    def consumed(worker: StreamsProcess) -> float:
        return sample(worker.scrape(), "mlbus_streams_records_total") or 0.0

    produce(kafka, records[:half])
    wait_until(
        lambda: sum(consumed(w) for w in workers) >= half,
        lambda: "the first half consumed\n" + "\n".join(w.log() for w in workers),
        timeout=90,
    )
    busier, survivor = sorted(workers, key=consumed, reverse=True)
    busier.kill()
    produce(kafka, records[half:])
    finish_exactly(kafka, h, survivor, "after the takeover")

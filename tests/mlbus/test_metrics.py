"""Every service's /metrics, as its manifest declares it: the services without an HTTP server
of their own get one from `mlbus run`, with the process collectors and their consumer group's
lag once they consumed something; Prometheus's checker (promtool) accepts every page."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.lag import record, snapshot
from mlbus.services import SERVICES, service
from mlbus.settings import Settings
from tests.mlbus.test_cli import (
    MLBUS,
    env,  # noqa: F401 - a fixture
    mlbus,
    ok,
)
from tests.promtool import check_metrics
from tests.serving.conftest import free_port

#: The services whose /metrics `mlbus run` serves (the others have their own HTTP server and
#: are checked in tests/serving, tests/streams and tests/mlbus/test_api.py).
OWN = [s.name for s in SERVICES if s.metrics.own_server]


def test_every_manifest_declares_its_metrics_and_the_own_servers_have_distinct_ports() -> None:
    cfg = Settings()
    ports = [s.metrics.port_of(cfg) for s in SERVICES]
    assert all(ports) and len(set(ports)) == len(ports)
    assert set(OWN) == {
        "validator",
        "trainer",
        "workflow",
        "lineage",
        "archive",
        "openlineage",
        "tuning",
    }
    off = Settings(metrics={"validator_port": 0})
    assert service("validator").metrics.port_of(off) == 0


def test_lag_comes_from_librdkafka_statistics_and_leaves_with_its_consumer() -> None:
    stats = (
        b'{"name": "c-test-lag", "topics": {"t": {"partitions": {'
        b'"0": {"fetch_state": "active", "consumer_lag": 7, "consumer_lag_stored": 2},'
        b'"1": {"fetch_state": "active", "consumer_lag": -1, "consumer_lag_stored": 3},'
        b'"2": {"fetch_state": "none", "consumer_lag": 9},'
        b'"3": {"fetch_state": "active", "consumer_lag": -1, "consumer_lag_stored": -1,'
        b' "hi_offset": 5, "lo_offset": 1},'
        b'"4": {"fetch_state": "active", "consumer_lag": -1, "hi_offset": -1001},'
        b'"-1": {"fetch_state": "none", "consumer_lag": -1}}}}}'
    )
    record("g-lag", 0, stats.decode())
    mine = {k: v for k, v in snapshot().items() if k[0] == "g-lag"}
    assert mine == {("g-lag", "t", 0): 7, ("g-lag", "t", 1): 3, ("g-lag", "t", 3): 4}


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def _lag(page: str, group: str) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "mlbus_consumer_lag" and s.labels["group"] == group
    ]


@pytest.mark.integration
def test_each_service_serves_its_metrics_with_its_lag_and_promtool_accepts_them(
    env: dict[str, str],  # noqa: F811 - the fixture imported above
    kafka: KafkaConfig,
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in OWN}
    env = env | {f"MLBUS_METRICS__{name.upper()}_PORT": str(p) for name, p in ports.items()}
    env |= {
        "MLBUS_METRICS__HOST": "127.0.0.1",
        "MLBUS_METRICS__LAG_INTERVAL_MS": "200",
        "MLBUS_OPENLINEAGE__TRANSPORT": "console",
    }
    procs: dict[str, subprocess.Popen[str]] = {}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in OWN}  # noqa: SIM115
    try:
        for name in OWN:
            procs[name] = subprocess.Popen(
                [MLBUS, "run", name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logs[name],
                stderr=subprocess.STDOUT,
                text=True,
            )
        # Something every one of them reads: a dataset version (and its validation).
        ok(mlbus("datasets", "sample", "iris", env=env))
        pending = dict(ports)
        pages: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while pending:
            for name, port in list(pending.items()):
                assert procs[name].poll() is None, (
                    f"mlbus run {name} exited:\n{(tmp_path / f'{name}.log').read_text()}"
                )
                page = _scrape(port)
                if not service(name).group:  # reads without a group (tuning): no lag to show
                    if "process_resident_memory_bytes" in page:
                        pages[name] = page
                        del pending[name]
                    continue
                lags = _lag(page, service(name).group_id(kafka.topic_prefix))
                if lags and all(v >= 0 for v in lags):
                    pages[name] = page
                    del pending[name]
            assert time.monotonic() < deadline, f"no consumer lag on /metrics of {sorted(pending)}"
            time.sleep(0.3)
        for name, page in pages.items():
            if service(name).group:
                group = service(name).group_id(kafka.topic_prefix)
                outcomes = {
                    s.labels["outcome"]
                    for family in text_string_to_metric_families(page)
                    for s in family.samples
                    if s.name == "mlbus_consumer_records_total" and s.labels["group"] == group
                }
                assert outcomes & {"handled", "written"}, (name, outcomes)
            assert "process_resident_memory_bytes" in page, name
            assert "python_gc_objects_collected_total" in page, name
            check_metrics(page)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logs[name].close()


def test_a_taken_metrics_port_is_logged_and_the_service_goes_on(caplog) -> None:
    import socket

    from mlbus.metrics import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(port, "127.0.0.1") is False
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


def test_services_list_shows_where_each_service_serves_its_metrics(tmp_path: Path) -> None:
    import json

    from tests.mlbus.test_cli import clean_env

    result = ok(mlbus("services", "list", "--json", env=clean_env(MLBUS_DATA_DIR=str(tmp_path))))
    rows = {row["service"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows["trainer"]["metrics"] == "/metrics on metrics.trainer_port"
    assert rows["serve"]["metrics"] == "/metrics on serving.port"

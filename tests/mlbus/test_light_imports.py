"""The services that never run a model idle without torch: importing what their entry point
builds (mlbus/services.py `build`) must not import it, so a quiet `mlbus up` stays light
(bench/idle.py). Those that read or write Parquet only when a dataset or a record comes (the
validator, the archiver, the API) load pyarrow then, not at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mlbus.cli.services as services_cli
from mlbus.cli.services import polling
from mlbus.kafka import config
from mlbus.kafka.config import LOOKUP_FETCH_WAIT_MS, QUIET_FETCH_WAIT_MS, KafkaConfig
from mlbus.services import SERVICES, service

pytestmark = pytest.mark.unit

#: service → the modules its entry point imports to start (the workflow's evaluator included:
#: it loads torch only when it evaluates).
LIGHT = {
    "validator": ["mlbus.cli.datasets", "mlbus.datasets.validator"],
    "workflow": [
        "mlbus.cli.workflow",
        "mlbus.consumers.workflow.service",
        "mlbus.consumers.workflow.evaluation",
    ],
    "lineage": ["mlbus.cli.lineage", "mlbus.consumers.lineage.live"],
    "archive": ["mlbus.cli.archive", "mlbus.consumers.archive.writer"],
    "streams": ["mlbus.cli.streams", "mlbus.streams.app"],
    "api": ["mlbus.cli.api", "mlbus.cli.control_plane", "mlbus.datasets.api"],
}

#: service → the heavy modules it must start without (besides torch).
WITHOUT = {
    "validator": ["pyarrow", "numpy"],
    "archive": ["pyarrow", "numpy"],
    "api": ["pyarrow", "numpy"],
}


def test_every_light_service_is_a_service() -> None:
    assert set(LIGHT) <= {s.name for s in SERVICES}
    for name, modules in LIGHT.items():
        assert service(name).build.partition(":")[0] == modules[0]


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_a_light_service_starts_without_torch(name: str) -> None:
    heavy = ["torch", *WITHOUT.get(name, [])]
    imports = "; ".join(f"import {m}" for m in LIGHT[name])
    code = f"import sys; {imports}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHONPATH": os.getcwd()},
    )
    assert out.stdout.strip() == "[]", f"{name} imports {out.stdout.strip()} at start"


def test_families_check_hyperparameters_without_torch_and_build_with_it() -> None:
    code = (
        "import sys; from mlbus.families import build, hyperparameters; "
        "p = hyperparameters('cnn', {'channels': 4}); print('torch' in sys.modules); "
        "m = build('cnn', 64, 10, p); print(type(m).__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["False", "ImageCNN True"]


def test_each_service_polls_the_embedded_broker_at_its_own_pace(monkeypatch) -> None:
    monkeypatch.setattr(config, "EMBEDDED_FETCH_WAIT_MS", [10])
    monkeypatch.setattr(services_cli, "EMBEDDED_FETCH_WAIT_MS", config.EMBEDDED_FETCH_WAIT_MS)
    monkeypatch.delenv("MLBUS_KAFKA__FETCH_WAIT_MAX_MS", raising=False)
    embedded = KafkaConfig("127.0.0.1:9092", embedded=True)
    assert embedded.consumer("g")["fetch.wait.max.ms"] == 10  # the tests' profile
    polling(service("lineage"))
    assert embedded.consumer("g")["fetch.wait.max.ms"] == 2000
    # Where `mlbus up` keeps a journal, idle consumers do not fetch: a short wait then.
    journaled = KafkaConfig("127.0.0.1:9092", embedded=True, journal="/data/journal")
    assert journaled.consumer("g")["fetch.wait.max.ms"] == QUIET_FETCH_WAIT_MS
    polling(service("serve"))
    assert embedded.consumer(None)["fetch.wait.max.ms"] == service("serve").fetch_wait_ms == 1000
    # A lookup (a view read to its end, then left) sees the end within a short wait.
    assert embedded.lookup()["fetch.wait.max.ms"] == LOOKUP_FETCH_WAIT_MS
    assert "fetch.wait.max.ms" not in KafkaConfig("kafka:9092").consumer("g")  # Kafka's
    mine = KafkaConfig("127.0.0.1:9092", embedded=True, extra={"fetch.wait.max.ms": "5"})
    assert mine.consumer("g")["fetch.wait.max.ms"] == "5"  # the user's choice wins
    assert mine.lookup()["fetch.wait.max.ms"] == "5"

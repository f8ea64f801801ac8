"""Experiments over a real sweep: a pipeline with a 2 x 2 grid applied, the digits sample
registered, and the platform's own processes (validator, trainer, workflow, lineage
projector) on the session broker train the four runs and decide on the best; then
`mlbus runs list/show/compare` and `GET /runs*` answer from the lineage store."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.runs import RunQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from tests.conftest import unique
from tests.mlbus.test_cli import MLBUS, clean_env, json_lines, mlbus, ok

pytestmark = pytest.mark.integration

SWEEP_YAML = """
name: sweep
dataset: digits
model: digits
family: mlp
hyperparameters: {dropout: 0.0}
sweep: {lr: [0.01, 0.003], hidden: [16, 32]}
seed: 0
max_epochs: 3
debounce_seconds: 0.5
policy: {name: sweep-best, version: 1, metric: test.accuracy, mode: max}
"""
PROCESSES = (
    ["datasets", "validate"],
    ["trainer"],
    ["workflow"],
    ["lineage", "project"],
)


@dataclass
class Sweep:
    env: dict[str, str]
    kafka: KafkaConfig
    data_dir: Path
    runs: list[str]
    champion: str

    @property
    def store(self) -> LineageStore:
        return LineageStore.open(f"sqlite:///{self.data_dir / 'metadata.db'}")


def _until(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def sweep(broker: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    kafka = replace(broker, topic_prefix=unique("t") + ".")
    apply_topics(kafka)
    tmp = tmp_path_factory.mktemp("sweep")
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp / "data"),
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
        MLBUS_KAFKA__SESSION_TIMEOUT_MS="2000",
        MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS="500",
        COLUMNS="250",
    )
    (tmp / "sweep.yaml").write_text(SWEEP_YAML)
    ok(mlbus("pipelines", "apply", str(tmp / "sweep.yaml"), "--actor", "user:ci", env=env))
    processes = [
        subprocess.Popen(
            [MLBUS, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in PROCESSES
    ]
    try:
        ok(mlbus("datasets", "sample", "digits", "--json", env=env))
        store = LineageStore.open(f"sqlite:///{tmp / 'data' / 'metadata.db'}")
        try:
            runs = _until(
                "four completed runs",
                lambda: (
                    [r.run_id for r in RunQueries(store).list("digits", "completed")]
                    if len(RunQueries(store).list("digits", "completed")) == 4
                    else None
                ),
            )
            champion = _until(
                "a decision on the sweep",
                lambda: next(
                    (m.champion.version for m in LineageQueries(store).models() if m.champion),
                    None,
                ),
            )
        finally:
            store.close()
        yield Sweep(env, kafka, tmp / "data", runs, champion)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        try:
            for process in processes:
                assert process.wait(30) == 0, process.stdout.read() if process.stdout else ""
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()


def test_runs_list_and_show_of_finished_runs(sweep: Sweep) -> None:
    listed = json_lines(
        ok(mlbus("runs", "list", "--model", "digits", "--json", env=sweep.env)).stdout
    )
    assert sorted(r["run_id"] for r in listed) == sorted(sweep.runs)
    assert {r["status"] for r in listed} == {"completed"}
    assert sorted((r["hyperparameters"]["lr"], r["hyperparameters"]["hidden"]) for r in listed) == [
        (0.003, 16), (0.003, 32), (0.01, 16), (0.01, 32)
    ]  # fmt: skip
    assert all(r["pipeline"] == "sweep" and r["sweep_id"] for r in listed)
    assert len({r["sweep_id"] for r in listed}) == 1
    best = json_lines(
        ok(
            mlbus(
                "runs", "list", "--status", "completed", "--sort", "test.accuracy", "--json",
                env=sweep.env,
            )
        ).stdout
    )  # fmt: skip
    accuracies = [r["metrics"]["test.accuracy"] for r in best]
    assert accuracies == sorted(accuracies, reverse=True)
    assert (
        json_lines(ok(mlbus("runs", "list", "--status", "failed", "--json", env=sweep.env)).stdout)
        == []
    )
    table = ok(mlbus("runs", "list", env=sweep.env)).stdout
    for run in sweep.runs:
        assert run[:12] in table

    winner = next(r for r in listed if r["version"] == sweep.champion)
    shown = json_lines(
        ok(mlbus("runs", "show", winner["run_id"][:10], "--json", env=sweep.env)).stdout
    )[0]
    assert shown["run_id"] == winner["run_id"] and shown["status"] == "completed"
    assert shown["dataset"].startswith("digits@") and shown["requested_by"]
    assert [e["epoch"] for e in shown["curves"]] == [1, 2, 3]
    assert all("train.loss" in e["metrics"] for e in shown["curves"])
    assert len(shown["confusion_matrix"]) == 10 and len(shown["labels"]) == 10
    assert sum(map(sum, shown["confusion_matrix"])) > 0
    assert shown["artifact"]["sha256"].startswith("sha256:")
    assert shown["final_metrics"]["test"]["accuracy"] == winner["metrics"]["test.accuracy"]
    assert [(d["kind"], d["policy"]) for d in shown["decisions"]][-1] == (
        "promoted", "sweep-best v1"
    )  # fmt: skip
    text = ok(mlbus("runs", "show", f"digits@{sweep.champion}", env=sweep.env)).stdout
    assert winner["run_id"] in text and "confusion matrix" in text and "learning curves" in text


def test_runs_compare_of_the_four_point_sweep(sweep: Sweep) -> None:
    compared = json_lines(
        ok(mlbus("runs", "compare", *sweep.runs, "--json", env=sweep.env)).stdout
    )[0]
    assert [r["run_id"] for r in compared["runs"]] == sweep.runs
    hyper = {row["name"]: row for row in compared["hyperparameters"]}
    assert hyper["lr"]["differs"] and hyper["hidden"]["differs"]
    assert not hyper["dropout"]["differs"]
    metrics = {row["name"]: row for row in compared["metrics"]}
    accuracy = metrics["test.accuracy"]["values"]
    if metrics["test.accuracy"]["differs"]:
        assert accuracy[metrics["test.accuracy"]["best"]] == max(accuracy)
    assert compared["policy_metric"] == "test.accuracy"
    assert compared["curves"] == ["train.loss", "validation.loss", "validation.accuracy"]
    assert all(len(r["curves"]) == 3 for r in compared["runs"])

    text = ok(mlbus("runs", "compare", *(r[:8] for r in sweep.runs), env=sweep.env)).stdout
    for run in sweep.runs:
        assert text.count(run[:12]) >= 4  # its column, and one sparkline per curve
    assert "learning curves" in text and "validation.accuracy" in text
    refused = mlbus("runs", "compare", sweep.runs[0], "nosuch", env=sweep.env)
    assert refused.returncode == 1 and "run 'nosuch' is not known" in refused.stderr

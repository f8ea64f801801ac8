"""`mlbus trainer` and `mlbus train`: a sweep published from the CLI is trained by a worker
process and reported as JSON lines; a failed run makes `--wait` exit non-zero."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.mlbus.test_cli import MLBUS, env, json_lines, mlbus, ok  # noqa: F401 - env is a fixture

FAST = {  # the embedded broker's settings (a configured bootstrap keeps Kafka's defaults)
    "MLBUS_KAFKA__FETCH_WAIT_MAX_MS": "10",
    "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
    "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
}


@pytest.fixture
def worker(env):  # noqa: F811
    """A training worker and the validator beside it (the worker trains validated
    versions only)."""
    env = env | FAST
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in ([MLBUS, "trainer"], [MLBUS, "datasets", "validate"])
    ]
    yield env
    for process in processes:
        process.send_signal(signal.SIGTERM)
    try:
        for process in processes:
            assert process.wait(30) == 0, process.stdout.read() if process.stdout else ""
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_a_sweep_from_the_cli_is_trained_and_reported(worker):
    sample = json_lines(ok(mlbus("datasets", "sample", "digits", "--json", env=worker)).stdout)[0]
    result = ok(
        mlbus(
            "train",
            "digits",
            "--dataset",
            f"digits@{sample['version'][:10]}",
            "--family",
            "mlp",
            "--epochs",
            "3",
            "--sweep",
            "hidden=16,32",
            "--wait",
            "--json",
            env=worker,
            timeout=180,
        )
    )
    runs = json_lines(result.stdout)
    assert sorted(r["hyperparameters"]["hidden"] for r in runs) == [16, 32]
    assert len({r["run_id"] for r in runs}) == 2
    for run in runs:
        assert run["artifact_sha256"].startswith("sha256:")
        assert run["metrics"]["test"]["accuracy"] > 0.5


def test_wait_exits_non_zero_when_a_run_fails(worker):
    sample = json_lines(ok(mlbus("datasets", "sample", "iris", "--json", env=worker)).stdout)[0]
    ref = f"iris@{sample['version'][:8]}"
    result = mlbus(
        "train",
        "iris",
        "--dataset",
        ref,
        "--family",
        "cnn",  # iris' 4 features are no square image: the run fails when it builds
        "--wait",
        "--json",
        env=worker,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip() == ""  # no completed run to report


def test_a_family_or_task_that_cannot_train_is_refused_before_anything_is_published(worker):
    sample = json_lines(ok(mlbus("datasets", "sample", "iris", "--json", env=worker)).stdout)[0]
    ref = f"iris@{sample['version'][:8]}"
    for options, message in (
        (("--family", "nosuch"), "unknown model family 'nosuch'"),
        (("--family", "no_such_module:build"), "cannot be imported: ModuleNotFoundError"),
        (("--family", "cnn", "--task", "ranking"), "does not support task 'ranking'"),
        (("--family", "mlp", "--task", "regression", "--loss", "l1"), "--loss 'l1'"),
    ):
        result = mlbus("train", "iris", "--dataset", ref, *options, env=worker, timeout=60)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "requested" not in result.stdout


def test_an_unknown_dataset_version_is_refused_before_anything_is_published(worker):
    ok(mlbus("datasets", "sample", "iris", "--json", env=worker))
    result = mlbus("train", "iris", "--dataset", "iris@0000", "--wait", env=worker, timeout=60)
    assert result.returncode == 1 and "dataset iris@0000: no version '0000'" in result.stderr
    assert "requested" not in result.stdout

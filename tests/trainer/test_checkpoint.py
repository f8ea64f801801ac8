"""Epoch checkpoints without the bus: a run stopped at an epoch boundary and continued from
its checkpoint on the object store ends with exactly the metrics of an uninterrupted run
(same seed, CPU); checkpoints hold no pickle, and a damaged one is ignored (restart)."""

from __future__ import annotations

import json

import pytest
import torch

from mlbus.datasets.samples import sample_table
from mlbus.families import hyperparameters
from mlbus.schemas.training import EarlyStopping
from mlbus.storage import ObjectStore
from mlbus.trainer import checkpoint
from mlbus.trainer.data import load_arrays, prepare
from mlbus.trainer.training import fit, inference_latency

IDENTITY = {"request_id": "r1", "family": "cnn", "seed": 5}


@pytest.fixture(scope="module")
def digits():
    table = sample_table("digits")
    features = [c for c in table.column_names if c != "label"]
    x, labels = load_arrays(
        table.to_batches(500), num_rows=table.num_rows, features=features, label="label"
    )
    return prepare(x, labels, features=features, label="label", seed=5, validation=0.15, test=0.15)


def _interrupted_then_resumed(data, store, family, params, *, stop_after, max_epochs, **kw):
    """Train until `stop_after` epochs are checkpointed, stop, then resume from the store."""
    done: list[int] = []

    def save(state):
        checkpoint.save(store, "run", state, IDENTITY)
        done.append(state.epoch)

    first = fit(
        data,
        family,
        params,
        max_epochs=max_epochs,
        seed=5,
        on_checkpoint=save,
        should_stop=lambda: len(done) >= stop_after,
        **kw,
    )
    assert first.stopped and first.epochs == stop_after
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resume = checkpoint.load(store, "run", IDENTITY)
    assert resume is not None and resume.epoch == stop_after
    epochs: list[int] = []
    second = fit(
        data,
        family,
        params,
        max_epochs=max_epochs,
        seed=5,
        resume=resume,
        on_checkpoint=save,
        on_epoch=lambda e, m, r: epochs.append(e),
        **kw,
    )
    assert epochs == list(range(stop_after + 1, second.epochs + 1))
    return second


@pytest.mark.parametrize(("family", "params"), [("cnn", {}), ("mlp", {"dropout": 0.3})])
def test_a_resumed_run_ends_with_the_metrics_of_an_uninterrupted_one(
    digits, tmp_path, family, params
):
    store = ObjectStore(tmp_path.as_uri())
    params = hyperparameters(family, params)
    whole = fit(digits, family, params, max_epochs=5, seed=5)
    resumed = _interrupted_then_resumed(digits, store, family, params, stop_after=2, max_epochs=5)
    assert resumed.epochs == whole.epochs == 5
    assert resumed.metrics == whole.metrics
    assert resumed.confusion_matrix == whole.confusion_matrix
    assert resumed.history == whole.history
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_early_stopping_state_survives_a_resume(digits, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    rule = EarlyStopping(metric="validation.loss", mode="min", patience=2, min_delta=10.0)
    params = hyperparameters("mlp", {})
    whole = fit(digits, "mlp", params, max_epochs=30, seed=5, early_stopping=rule)
    resumed = _interrupted_then_resumed(
        digits, store, "mlp", params, stop_after=2, max_epochs=30, early_stopping=rule
    )
    assert whole.epochs == resumed.epochs == 3  # best at 1, stale at 2 and 3
    assert resumed.metrics == whole.metrics


def test_checkpoints_are_safetensors_and_json_and_only_the_last_is_kept(digits, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    params = hyperparameters("mlp", {})
    fit(
        digits,
        "mlp",
        params,
        max_epochs=3,
        seed=5,
        on_checkpoint=lambda s: checkpoint.save(store, "run", s, IDENTITY),
    )
    keys = store.list("runs/run/checkpoint")
    assert keys == [
        "runs/run/checkpoint/checkpoint.json",
        "runs/run/checkpoint/epoch-0003.safetensors",
    ]
    document = json.loads(store.read_bytes("runs/run/checkpoint/checkpoint.json"))
    assert document["epoch"] == 3 and len(document["history"]) == 3
    raw = store.read_bytes("runs/run/checkpoint/epoch-0003.safetensors")
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors header
    assert {"rng.torch", "rng.generator", "model.0.weight", "optimiser.0.exp_avg"} <= set(header)


def test_an_unusable_checkpoint_means_a_restart(digits, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    params = hyperparameters("mlp", {})
    fit(
        digits,
        "mlp",
        params,
        max_epochs=1,
        seed=5,
        on_checkpoint=lambda s: checkpoint.save(store, "run", s, IDENTITY),
    )
    assert checkpoint.load(store, "run", IDENTITY | {"seed": 6}) is None  # another request's
    key = "runs/run/checkpoint/epoch-0001.safetensors"
    raw = bytearray(store.read_bytes(key))
    raw[-1] ^= 0xFF
    store.write_bytes(key, bytes(raw))
    assert checkpoint.load(store, "run", IDENTITY) is None  # damaged
    assert checkpoint.load(store, "other-run", IDENTITY) is None  # none


def test_inference_latency_is_measured_on_single_rows(digits):
    result = fit(digits, "mlp", hyperparameters("mlp", {}), max_epochs=1, seed=5)
    latency = inference_latency(result.model, digits.x["test"], samples=20)
    assert set(latency) == {"latency_p50_ms", "latency_p95_ms"}
    assert 0 < latency["latency_p50_ms"] <= latency["latency_p95_ms"]

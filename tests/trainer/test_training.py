"""The trainer's building blocks, without the bus: model families and their hyperparameter
checks, Arrow → tensors, a deterministic digits CNN that reaches 95 % test accuracy, and
safetensors artifacts that load back to the same accuracy and refuse tampered bytes."""

from __future__ import annotations

import pytest
import torch

from mlbus import artifacts
from mlbus.datasets.samples import sample_table
from mlbus.families import FAMILIES, InvalidModelSpec, build, hyperparameters
from mlbus.ml.card import ModelCard
from mlbus.schemas.training import EarlyStopping
from mlbus.storage import ObjectStore
from mlbus.tables import HashMismatch
from mlbus.trainer.data import InvalidTrainingRequest, load_arrays, prepare
from mlbus.trainer.training import evaluate, fit


@pytest.fixture(scope="module")
def digits():
    table = sample_table("digits")
    features = [c for c in table.column_names if c != "label"]
    x, labels = load_arrays(
        table.to_batches(500), num_rows=table.num_rows, features=features, label="label"
    )
    return prepare(x, labels, features=features, label="label", seed=7, validation=0.15, test=0.15)


def _train(data, epochs=15, seed=7, **changes):
    params = hyperparameters("cnn", changes)
    return fit(data, "cnn", params, max_epochs=epochs, seed=seed)


def test_built_in_families_are_registered():
    assert {"mlp", "cnn"} <= set(FAMILIES)


@pytest.mark.parametrize(
    ("family", "given", "problem"),
    [
        ("transformer", {}, "unknown model family 'transformer'"),
        ("mlp", {"hidden": 0}, "hidden=0 is out of range"),
        ("mlp", {"lr": 5.0}, "lr=5.0 is out of range"),
        ("mlp", {"depth": 3}, "'depth' is not one of mlp's"),
        ("mlp", {"layers": "two"}, "layers='two' is out of range"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(family, given, problem):
    with pytest.raises(InvalidModelSpec, match=problem):
        hyperparameters(family, given)


def test_cnn_needs_square_images():
    with pytest.raises(InvalidModelSpec, match="not a square"):
        build("cnn", 30, 2, hyperparameters("cnn", {}))


def test_a_split_that_leaves_nothing_to_train_on_is_an_invalid_request(digits):
    x, labels = digits.x["train"].numpy(), digits.y["train"].numpy()
    with pytest.raises(InvalidTrainingRequest, match="leave rows to train on"):
        prepare(
            x, labels, features=digits.features, label="label", seed=1, validation=0.5, test=0.5
        )


def test_features_are_standardised_with_training_statistics(digits):
    train = digits.x["train"]
    assert torch.allclose(train.mean(dim=0), torch.zeros(train.shape[1]), atol=1e-4)
    assert digits.classes == [str(i) for i in range(10)]


def test_digits_cnn_reaches_95_percent_and_is_deterministic(digits):
    epochs: list[int] = []
    first = fit(
        digits,
        "cnn",
        hyperparameters("cnn", {}),
        max_epochs=15,
        seed=7,
        on_epoch=lambda epoch, metrics, rate: epochs.append(epoch),
    )
    assert first.metrics["test"]["accuracy"] >= 0.95, first.metrics
    assert epochs == list(range(1, first.epochs + 1))
    again = _train(digits)
    assert again.metrics == first.metrics
    assert sum(map(sum, first.confusion_matrix)) == len(digits.y["test"])


def test_early_stopping_stops_before_max_epochs(digits):
    rule = EarlyStopping(metric="validation.loss", mode="min", patience=1, min_delta=10.0)
    result = fit(
        digits, "mlp", hyperparameters("mlp", {}), max_epochs=30, seed=1, early_stopping=rule
    )
    assert result.epochs == 2  # nothing improves by 10: stop after the patience of one epoch


def cnn_card(digits) -> ModelCard:
    """The card the trainer writes for a default CNN on the prepared `digits`."""
    mean, std = digits.standardisation.to_lists()
    return ModelCard(
        family="cnn",
        features=digits.features,
        label=digits.label,
        classes=digits.classes,
        hyperparameters=hyperparameters("cnn", {}),
        mean=mean,
        std=std,
    )


def test_artifact_round_trip_gives_the_same_accuracy(digits, tmp_path):
    result = _train(digits, epochs=5)
    store = ObjectStore(tmp_path.as_uri())
    card = cnn_card(digits)
    saved = artifacts.save(store, "models/digits/r1", result.model, card)
    model, loaded_card = artifacts.load(
        store, saved["uri"], saved["sha256"], saved["model_card_uri"]
    )
    metrics, _ = evaluate(model, digits.x["test"], digits.y["test"], len(digits.classes))
    assert metrics["accuracy"] == result.metrics["test"]["accuracy"]
    assert loaded_card.weights_sha256 == saved["sha256"]
    assert loaded_card == card.model_copy(update={"weights_sha256": saved["sha256"]})
    assert (
        store.read_bytes("models/digits/r1/model.safetensors")[:8] != b"\x80\x04\x95"
    )  # no pickle


def test_a_tampered_artifact_is_refused(digits, tmp_path):
    result = _train(digits, epochs=1)
    store = ObjectStore(tmp_path.as_uri())
    card = cnn_card(digits)
    saved = artifacts.save(store, "m/r", result.model, card)
    raw = bytearray(store.read_bytes("m/r/model.safetensors"))
    raw[-1] ^= 0xFF
    store.write_bytes("m/r/model.safetensors", bytes(raw))
    with pytest.raises(HashMismatch, match="weights hash to"):
        artifacts.load(store, saved["uri"], saved["sha256"], saved["model_card_uri"])

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
from mlbus.trainer.training import evaluate, fit, use_threads


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


# -- tensor inputs, a plugin family, regression ----------------------------------------------


def _tensor_data(table, family, task="classification"):
    from mlbus.families import resolve
    from mlbus.ml.tensors import tensor_shape

    features = [c for c in table.column_names if c != "label"]
    shape = tensor_shape(table.schema, features)
    x, labels = load_arrays(
        table.to_batches(500), num_rows=table.num_rows, features=features, label="label",
        shape=shape,
    )  # fmt: skip
    input_shape = shape or [len(features)]
    return prepare(
        x, labels, features=features, label="label", seed=3, validation=0.15, test=0.15,
        task=task, input_shape=shape, feed_shape=resolve(family).feed_shape(input_shape),
    )  # fmt: skip


def test_images_as_a_tensor_column_train_the_plugin_family_and_its_artifact_loads(tmp_path):
    data = _tensor_data(sample_table("digits_images"), "resnet")
    assert data.input_shape == [1, 8, 8] and data.x["train"].shape[1:] == (1, 8, 8)
    assert data.standardisation.n_features == 1  # one mean and std for the whole tensor
    params = hyperparameters("resnet", {"width": 16, "blocks": 1, "lr": 0.01})
    result = fit(data, "resnet", params, max_epochs=3, seed=3)
    assert result.metrics["test"]["accuracy"] >= 0.8
    from mlbus.families import resolve

    mean, std = data.standardisation.to_lists()
    card = ModelCard(
        family="resnet", hyperparameters=params, features=["image"], classes=data.classes,
        mean=mean, std=std, label="label", input_shape=[1, 8, 8],
        family_origin=resolve("resnet").origin,
    )  # fmt: skip
    store = ObjectStore(tmp_path.as_uri())
    saved = artifacts.save(store, "m/1", result.model, card)
    model, loaded = artifacts.load(store, saved["uri"], saved["sha256"], saved["model_card_uri"])
    assert loaded.sample_shape == [1, 8, 8] and loaded.family_origin == card.family_origin
    test = data.x["test"]
    with torch.no_grad():
        assert torch.equal(model(test).argmax(1), result.model.eval()(test).argmax(1))


def test_ragged_or_undeclared_tensor_columns_and_text_targets_are_refused():
    import numpy as np
    import pyarrow as pa

    from mlbus.ml.tensors import InvalidTensorColumn, tensor_rows, tensor_shape

    shaped = pa.field("image", pa.list_(pa.float32()), metadata={"shape": "[2, 2]"})
    ragged = pa.table(
        [pa.array([[1, 2, 3, 4], [1, 2, 3]], pa.list_(pa.float32())), pa.array([0, 1])],
        schema=pa.schema([shaped, pa.field("label", pa.int64())]),
    )
    assert tensor_shape(ragged.schema, ["image"]) == [2, 2]
    with pytest.raises(InvalidTensorColumn, match=r"rows have different lengths \(row 1 has 3"):
        load_arrays(
            ragged.to_batches(), num_rows=2, features=["image"], label="label", shape=[2, 2]
        )
    undeclared = pa.schema([pa.field("image", pa.list_(pa.float32()))])
    with pytest.raises(InvalidTensorColumn, match="declare its shape"):
        tensor_shape(undeclared, ["image"])
    with pytest.raises(InvalidTensorColumn, match="null rows"):
        tensor_rows(pa.array([[1.0], None], pa.list_(pa.float32())), "image", 1, 2)
    with pytest.raises(InvalidTrainingRequest, match="regression target 'y' is not numeric"):
        prepare(
            np.zeros((20, 2), np.float32), np.array(["a", "b"] * 10), features=["a", "b"],
            label="y", seed=0, validation=0.2, test=0.2, task="regression",
        )  # fmt: skip


def test_regression_on_diabetes_reports_rmse_mae_r2_in_the_targets_units():
    data = _tensor_data(sample_table("diabetes"), "mlp", task="regression")
    assert data.classes == [] and data.y["train"].shape[1:] == (1,)
    params = hyperparameters("mlp", {"hidden": 32, "lr": 0.01, "dropout": 0.0})
    for loss in ("mse", "huber"):
        result = fit(data, "mlp", params, max_epochs=30, seed=3, loss=loss)
        test = result.metrics["test"]
        assert set(test) == {"loss", "rmse", "mae", "r2"} and result.confusion_matrix is None
        assert 30 < test["rmse"] < 75 and test["mae"] < test["rmse"] and test["r2"] > 0.2
        assert "validation.rmse" in result.history[-1]


def test_use_threads_sets_the_calling_threads_count_and_zero_keeps_the_default():
    import threading

    seen: dict[str, int] = {}

    def train() -> None:
        before = torch.get_num_threads()
        seen["zero"], seen["after zero"] = use_threads(0), torch.get_num_threads()
        seen["before"] = before
        seen["two"], seen["after two"] = use_threads(2), torch.get_num_threads()
        use_threads(before)  # as the rest of the session expects

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert seen["zero"] == seen["after zero"] == seen["before"]
    assert seen["two"] == seen["after two"] == 2

"""The model card: a typed card survives the JSON round trip (unknown fields included),
and a wrong card is refused with the field that is wrong named."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from mlbus.ml.card import InvalidModelCard, ModelCard


def _fields(**changes: Any) -> dict[str, Any]:
    return {
        "family": "mlp",
        "hyperparameters": {"hidden": 8, "dropout": 0.1, "act": "relu"},
        "features": ["a", "b"],
        "feature_types": {"a": "double", "b": "int64", "y": "string"},
        "label": "y",
        "classes": ["no", "yes"],
        "mean": [0.5, 2.0],
        "std": [1.5, 0.0],
        "metrics": {"test": {"accuracy": 0.9}},
        "dataset": {"name": "d", "version": "v1"},
        "run_id": "r",
        "torch_version": "2.0",
        "device": "cpu",
    } | changes


def test_a_card_round_trips_through_json_with_unknown_fields_kept():
    card = ModelCard(**_fields(calibration={"method": "platt"}))
    saved = card.to_json()
    again = ModelCard.from_json(saved)
    assert again == card
    assert again.hyperparameters == {"hidden": 8, "dropout": 0.1, "act": "relu"}
    assert type(again.hyperparameters["hidden"]) is int  # not turned into 8.0
    assert json.loads(saved)["calibration"] == {"method": "platt"}  # a newer writer's field
    assert "weights_sha256" not in json.loads(saved)  # unset optional fields are left out
    with pytest.raises(ValidationError):
        card.family = "cnn"  # frozen


def test_the_card_gives_its_standardisation():
    s = ModelCard(**_fields()).standardisation
    assert s.apply(np.asarray([[2.0, 7.0]], np.float32)).tolist() == [[1.0, 5.0]]


def test_a_card_as_the_trainer_wrote_it_before_it_was_typed_still_loads():
    written = json.dumps(_fields(weights_sha256="sha256:" + "0" * 64), indent=2, sort_keys=True)
    card = ModelCard.from_json(written)
    assert card.dataset is not None and card.dataset.version == "v1"
    assert card.to_json().decode() == written


@pytest.mark.parametrize(("changes", "named"), [
    ({"std": [1.0]}, "std: 1 values for 2 features"),
    ({"mean": [0.0, 1.0, 2.0]}, "mean: 3 values for 2 features"),
    ({"std": [1.0, -1.0]}, "std.1: Input should be greater than or equal to 0"),
    ({"mean": [0.0, float("nan")]}, "mean.1: Input should be a finite number"),
    ({"classes": ["only"]}, "classes: a classifier needs at least 2, not 1"),
    ({"features": "a"}, "features: Input should be a valid list"),
    ({"hyperparameters": None}, "hyperparameters: Input should be a valid dictionary"),
])  # fmt: skip
def test_a_wrong_card_is_refused_with_the_field_named(changes, named):
    with pytest.raises(InvalidModelCard, match=named.replace("[", r"\[")) as refused:
        ModelCard.from_json(json.dumps(_fields(**changes)), source="s3://b/m/model_card.json")
    assert str(refused.value).startswith("model card s3://b/m/model_card.json: ")


def test_a_card_without_a_required_field_or_not_a_card_is_refused():
    fields = _fields()
    del fields["family"], fields["label"]
    with pytest.raises(InvalidModelCard, match="family: Field required; label: Field required"):
        ModelCard.from_json(json.dumps(fields))
    with pytest.raises(InvalidModelCard, match="not JSON"):
        ModelCard.from_json(b"{")
    with pytest.raises(InvalidModelCard, match="a JSON object expected"):
        ModelCard.from_json(b"[]")

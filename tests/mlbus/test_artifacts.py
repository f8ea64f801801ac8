"""Loading an artifact translates what safetensors, torch and the JSON parser raise into
mlbus errors that name the problem: every caller (the model server, the workflow's
re-evaluation) handles only those."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mlbus import artifacts
from mlbus.artifacts import InvalidArtifact
from mlbus.families import InvalidModelSpec, build, hyperparameters
from mlbus.ml.card import InvalidModelCard, ModelCard
from mlbus.storage import ObjectStore
from mlbus.tables import HashMismatch


def saved_artifact(root: Path) -> tuple[ObjectStore, dict]:
    """An mlp artifact saved on a store at `root` (the store and the saved reference)."""
    store = ObjectStore(root.as_uri())
    params = hyperparameters("mlp", {"hidden": 4})
    card = ModelCard(
        family="mlp",
        hyperparameters=params,
        features=["a", "b"],
        label="c",
        classes=["x", "y"],
        mean=[0.0, 0.0],
        std=[1.0, 1.0],
    )
    return store, artifacts.save(store, "m/1", build("mlp", 2, 2, params), card)


def _rewrite_card(store: ObjectStore, saved: dict, **changes: object) -> None:
    key = store.key_of(saved["model_card_uri"])
    card = json.loads(store.read_bytes(key))
    store.write_bytes(key, json.dumps(card | changes).encode())


def test_bytes_that_are_not_safetensors_are_an_invalid_artifact_even_with_their_real_hash(
    tmp_path: Path,
):
    store, saved = saved_artifact(tmp_path)
    parquet = b"PAR1" + bytes(range(256)) * 4 + b"PAR1"  # what a dataset's file starts with
    store.write_bytes("datasets/d/1/data.parquet", parquet)
    uri = store.uri("datasets/d/1/data.parquet")
    digest = "sha256:" + hashlib.sha256(parquet).hexdigest()
    with pytest.raises(InvalidArtifact, match=r"data\.parquet: not a safetensors file"):
        artifacts.load(store, uri, digest, saved["model_card_uri"])


def test_each_way_an_artifact_cannot_load_has_its_own_error(tmp_path: Path):
    store, saved = saved_artifact(tmp_path)
    args = (store, saved["uri"], saved["sha256"], saved["model_card_uri"])
    artifacts.load(*args)  # as saved, it loads
    with pytest.raises(HashMismatch):
        artifacts.load(store, saved["uri"], "sha256:" + "0" * 64, saved["model_card_uri"])
    _rewrite_card(store, saved, family="transformer")
    with pytest.raises(InvalidModelSpec, match="unknown model family 'transformer'"):
        artifacts.load(*args)
    wider = hyperparameters("mlp", {"hidden": 8})
    _rewrite_card(store, saved, family="mlp", hyperparameters=wider)
    with pytest.raises(InvalidArtifact, match="do not fit the mlp") as caught:
        artifacts.load(*args)
    assert len(str(caught.value)) < artifacts.MAX_DETAIL + 200  # torch's list is cut short
    store.write_bytes(store.key_of(saved["model_card_uri"]), b"\xff\xfe not json")
    with pytest.raises(InvalidModelCard, match="not JSON"):
        artifacts.load(*args)

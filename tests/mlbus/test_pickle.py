"""A pickle is never executed: weights or a model card that are pickles (plain, or torch's
zip format) are refused by `artifacts.load` with an error naming the problem, and the
payload — whose unpickling would create a marker file — never runs. The model server's
and the trainer's checkpoint's versions of this probe use `detonators` too."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch

from mlbus import artifacts
from mlbus.artifacts import InvalidArtifact
from mlbus.ml.card import InvalidModelCard
from mlbus.storage import ObjectStore
from tests.mlbus.test_artifacts import saved_artifact


class Detonator:
    """Unpickling it creates `marker` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def detonators(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded: plain, and as `torch.save` writes them (what
    a `.pt` checkpoint or weights file of another tool is)."""
    buffer = io.BytesIO()
    torch.save({"weight": Detonator(marker)}, buffer)
    return {"pickle": pickle.dumps(Detonator(marker)), "torch.save": buffer.getvalue()}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_the_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """Else the tests that use them could not fail: loaded the unsafe way, each creates its
    marker."""
    marker = tmp_path / "executed"
    payload = detonators(marker)[kind]
    if kind == "torch.save":
        torch.load(io.BytesIO(payload), weights_only=False)
    else:
        pickle.loads(payload)  # the unsafe way, on purpose
    assert marker.exists()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ObjectStore, dict]:
    return saved_artifact(tmp_path / "objects")


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_weights_that_are_a_pickle_are_refused_unexecuted(
    saved: tuple[ObjectStore, dict], tmp_path: Path, kind: str
) -> None:
    store, good = saved
    marker = tmp_path / "executed"
    payload = detonators(marker)[kind]
    store.write_bytes("m/2/model.safetensors", payload)
    with pytest.raises(InvalidArtifact, match=r"m/2/model\.safetensors: not a safetensors file"):
        artifacts.load(
            store, store.uri("m/2/model.safetensors"), sha256(payload), good["model_card_uri"]
        )
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_model_card_that_is_a_pickle_is_refused_unexecuted(
    saved: tuple[ObjectStore, dict], tmp_path: Path, kind: str
) -> None:
    store, good = saved
    marker = tmp_path / "executed"
    store.write_bytes("m/2/model_card.json", detonators(marker)[kind])
    with pytest.raises(InvalidModelCard, match=r"model card .*m/2/model_card\.json"):
        artifacts.load(store, good["uri"], good["sha256"], store.uri("m/2/model_card.json"))
    assert not marker.exists()

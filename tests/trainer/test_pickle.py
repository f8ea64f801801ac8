"""A checkpoint whose tensor file is a pickle (its hash recorded as the trainer would) is
never executed: the checkpoint is unusable, so the run restarts from epoch 0, and the
payload's marker file does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlbus.storage import ObjectStore
from mlbus.trainer import checkpoint
from tests.mlbus.test_pickle import detonators, sha256

IDENTITY = {"request_id": "r1", "family": "mlp", "seed": 5}


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_checkpoint_holding_a_pickle_is_ignored_unexecuted(tmp_path: Path, kind: str) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    marker = tmp_path / "executed"
    payload = detonators(marker)[kind]
    store.write_bytes("runs/run/checkpoint/epoch-0001.pt", payload)
    document = {
        "format": checkpoint.FORMAT,
        "identity": IDENTITY,
        "tensors": "epoch-0001.pt",
        "sha256": sha256(payload),
        "epoch": 1,
        "history": [],
        "best": None,
        "stale": 0,
        "finished": False,
        "optimiser": {"param_groups": [], "states": [], "scalars": {}},
    }
    store.write_bytes("runs/run/checkpoint/checkpoint.json", json.dumps(document).encode())
    assert checkpoint.load(store, "run", IDENTITY) is None
    assert not marker.exists()

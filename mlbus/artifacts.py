"""Model artifacts: safetensors weights plus a JSON model card, on the object store. Never
a pickle, so loading an artifact cannot execute code. The weights' sha256 travels in
`training.completed`; loading verifies it before anything is deserialised."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights
from torch import nn

from mlbus.families import build
from mlbus.storage import ObjectStore
from mlbus.tables import HashMismatch

WEIGHTS = "model.safetensors"
CARD = "model_card.json"


def save(store: ObjectStore, prefix: str, model: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """Write weights and card under `prefix`; returns uri, sha256, card uri and size."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = save_weights(state)
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    store.write_bytes(f"{prefix}/{WEIGHTS}", weights)
    card = card | {"weights_sha256": digest}
    store.write_bytes(f"{prefix}/{CARD}", json.dumps(card, indent=2, sort_keys=True).encode())
    return {
        "uri": store.uri(f"{prefix}/{WEIGHTS}"),
        "sha256": digest,
        "model_card_uri": store.uri(f"{prefix}/{CARD}"),
        "size_bytes": len(weights),
    }


def load(
    store: ObjectStore, uri: str, sha256: str, card_uri: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode) and its card; `HashMismatch` if the weights' bytes differ."""
    weights = store.read_bytes(store.key_of(uri))
    actual = "sha256:" + hashlib.sha256(weights).hexdigest()
    if actual != sha256:
        raise HashMismatch(f"{uri}: weights hash to {actual}, not the expected {sha256}")
    card = json.loads(store.read_bytes(store.key_of(card_uri)))
    model = build(
        card["family"], len(card["features"]), len(card["classes"]), card["hyperparameters"]
    )
    model.load_state_dict(load_weights(weights), strict=True)
    return model.eval(), card

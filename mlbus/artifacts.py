"""Model artifacts: safetensors weights plus a JSON model card (`mlbus.ml.card.ModelCard`),
on the object store. Never a pickle, so loading an artifact cannot execute code. The
weights' sha256 travels in `training.completed`; loading verifies it before anything is
deserialised, and validates the card before the model is built from it.

This is the one place artifacts are loaded: what safetensors, torch and the JSON parser
raise is translated here, so every caller gets an mlbus error naming the problem —
`HashMismatch`, `InvalidModelCard`, `InvalidModelSpec` (a family this build does not have;
`FamilyUnavailable` when a plugin family's distribution is missing or at another version),
`InvalidArtifact` (bytes that are not safetensors, or weights that do not fit the card's
model), `StorageError` or, for an object store that cannot be reached, `TransientError`."""

from __future__ import annotations

import hashlib
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights
from torch import nn

from mlbus.errors import Invalid
from mlbus.families import InvalidModelSpec, build, resolve
from mlbus.ml.card import ModelCard
from mlbus.storage import ObjectStore
from mlbus.tables import HashMismatch

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
#: The longest third-party message kept in an error (a state dict mismatch lists every key).
MAX_DETAIL = 500


class InvalidArtifact(Invalid):
    """Weights that cannot be loaded: bytes that are not safetensors, or tensors that do not
    fit the model the card describes. Final: the same bytes never load."""


def save(store: ObjectStore, prefix: str, model: nn.Module, card: ModelCard) -> dict[str, Any]:
    """Write weights and card (with the weights' hash) under `prefix`; returns uri, sha256,
    card uri and size."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = save_weights(state)
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    store.write_bytes(f"{prefix}/{WEIGHTS}", weights)
    card = card.model_copy(update={"weights_sha256": digest})
    store.write_bytes(f"{prefix}/{CARD}", card.to_json())
    return {
        "uri": store.uri(f"{prefix}/{WEIGHTS}"),
        "sha256": digest,
        "model_card_uri": store.uri(f"{prefix}/{CARD}"),
        "size_bytes": len(weights),
    }


def load(store: ObjectStore, uri: str, sha256: str, card_uri: str) -> tuple[nn.Module, ModelCard]:
    """The model (eval mode) and its card; `HashMismatch` if the weights' bytes differ,
    `InvalidModelCard` (naming the field) if the card is not one, `InvalidModelSpec` if its
    family is unknown, `InvalidArtifact` if the weights are not safetensors or do not fit."""
    weights = store.read_bytes(store.key_of(uri))
    actual = "sha256:" + hashlib.sha256(weights).hexdigest()
    if actual != sha256:
        raise HashMismatch(f"{uri}: weights hash to {actual}, not the expected {sha256}")
    card = ModelCard.from_json(store.read_bytes(store.key_of(card_uri)), source=card_uri)
    try:
        resolve(card.family, card.family_origin)
    except InvalidModelSpec as e:
        raise type(e)(f"model card {card_uri}: {e}") from None
    try:
        model = build(card.family, card.sample_shape, card.n_outputs, card.hyperparameters)
    except InvalidModelSpec as e:  # the family's own checks, or its build failing
        raise InvalidModelSpec(f"model card {card_uri}: cannot build it: {e}") from None
    try:
        tensors = load_weights(weights)
    except SafetensorError as e:  # a Parquet file, a pickle, a truncated upload...
        raise InvalidArtifact(f"{uri}: not a safetensors file ({_detail(e)})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:  # missing keys, other shapes
        raise InvalidArtifact(
            f"{uri}: the weights do not fit the {card.family} its card describes: {_detail(e)}"
        ) from None
    return model.eval(), card


def _detail(error: BaseException) -> str:
    """A third-party message on one line, cut to MAX_DETAIL characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"

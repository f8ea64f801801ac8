"""Epoch checkpoints of a run on the object store, so that a redelivered request (worker
killed, shut down, or a transient failure) continues where the run stopped.

Layout under `runs/{run_id}/checkpoint/`: `epoch-NNNN.safetensors` holds every tensor
(weights, optimiser moments, generator states) and `checkpoint.json` the rest (epoch,
history, early-stopping state, optimiser hyperparameters) plus the sha256 of the tensor
file. Never a pickle (no `torch.save`/`torch.load`), so reading a checkpoint cannot execute
code. Each object is written staged (it appears whole or not at all) and `checkpoint.json`
is written last: it is the commit point, so a crash between the two leaves the previous
checkpoint in force.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mlbus.errors import TransientError
from mlbus.storage import ObjectStore, StorageError
from mlbus.trainer.training import Checkpoint

log = logging.getLogger(__name__)

FORMAT = 1


def prefix(run_id: str) -> str:
    return f"runs/{run_id}/checkpoint"


def encode(checkpoint: Checkpoint, identity: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(safetensors bytes, JSON document without the tensor file's name and hash)."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in checkpoint.model.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in checkpoint.optimiser["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimiser.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = checkpoint.rng
    tensors["rng.generator"] = checkpoint.generator
    if checkpoint.cuda_rng is not None:
        tensors["rng.cuda"] = checkpoint.cuda_rng
    document = {
        "format": FORMAT,
        "identity": dict(identity),
        "epoch": checkpoint.epoch,
        "history": checkpoint.history,
        "best": checkpoint.best,
        "stale": checkpoint.stale,
        "finished": checkpoint.finished,
        "optimiser": {
            "param_groups": checkpoint.optimiser["param_groups"],
            "states": sorted(str(i) for i in checkpoint.optimiser["state"]),
            "scalars": scalars,
        },
    }
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    return save_tensors(contiguous), document


def decode(weights: bytes, document: Mapping[str, Any]) -> Checkpoint:
    tensors = load_tensors(weights)
    optimiser = document["optimiser"]
    state: dict[int, dict[str, Any]] = {}
    for index in optimiser["states"]:
        mine = {
            k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optimiser.{index}.")
        }
        state[int(index)] = mine | optimiser["scalars"].get(index, {})
    return Checkpoint(
        epoch=int(document["epoch"]),
        model={k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
        optimiser={"state": state, "param_groups": optimiser["param_groups"]},
        generator=tensors["rng.generator"],
        rng=tensors["rng.torch"],
        history=list(document["history"]),
        best=document["best"],
        stale=int(document["stale"]),
        finished=bool(document["finished"]),
        cuda_rng=tensors.get("rng.cuda"),
    )


def save(
    store: ObjectStore, run_id: str, checkpoint: Checkpoint, identity: Mapping[str, Any]
) -> None:
    """Write the checkpoint of `checkpoint.epoch`, then drop the one it replaces."""
    weights, document = encode(checkpoint, identity)
    name = f"epoch-{checkpoint.epoch:04d}.safetensors"
    store.write_bytes(f"{prefix(run_id)}/{name}", weights)
    previous = _document(store, run_id)
    document |= {"tensors": name, "sha256": "sha256:" + hashlib.sha256(weights).hexdigest()}
    store.write_bytes(
        f"{prefix(run_id)}/checkpoint.json", json.dumps(document, sort_keys=True).encode()
    )
    if previous is not None and previous.get("tensors") not in (None, name):
        store.delete(f"{prefix(run_id)}/{previous['tensors']}")


def load(store: ObjectStore, run_id: str, identity: Mapping[str, Any]) -> Checkpoint | None:
    """The run's last checkpoint, or None when there is none or it cannot be used (written
    for another request identity, damaged): then the run restarts from epoch 0, which gives
    the same result, only later. An unreachable store is a `TransientError` (retried)."""
    try:
        document = _document(store, run_id)
        if document is None:
            return None
        if document.get("format") != FORMAT or document.get("identity") != dict(identity):
            log.warning("run %s: checkpoint written for another request; restarting", run_id)
            return None
        weights = store.read_bytes(f"{prefix(run_id)}/{document['tensors']}")
        if "sha256:" + hashlib.sha256(weights).hexdigest() != document["sha256"]:
            log.warning("run %s: checkpoint tensors do not match their hash; restarting", run_id)
            return None
        return decode(weights, document)
    except TransientError:
        raise
    except (StorageError, SafetensorError, KeyError, ValueError, TypeError) as e:
        # SafetensorError: tensor bytes that are not safetensors (never unpickled)
        log.warning("run %s: checkpoint unusable (%s); restarting", run_id, e)
        return None


def _document(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    key = f"{prefix(run_id)}/checkpoint.json"
    if not store.exists(key):
        return None
    return json.loads(store.read_bytes(key))

"""The versions a replica serves: a `Deployment` is one loaded, verified model version
(weights, card, its micro-batcher); the `Registry` maps each model to its current and
previous deployment, and during a rollout to a candidate beside them with the `Route` that
splits requests between the current (stable) version and the candidate; it swaps them
atomically.

No topics here: serving/deployer.py feeds it from `model.promoted` and `model.traffic`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mlbus.errors import MlbusError, TransientError, UnknownModel
from mlbus.families import resolve
from mlbus.ml.card import ModelCard
from mlbus.serving.batcher import MicroBatcher
from mlbus.serving.errors import UnknownVersion, VerificationFailed
from mlbus.storage import ObjectStore

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: OIP name of the one input tensor every card-described model takes: [batch, features],
#: or [batch, *shape] for a model trained on a tensor column ([batch, 1, 8, 8]).
INPUT = "input"
#: OIP outputs of a classifier: the class label of each row, and the class probabilities.
LABEL, PROBABILITIES = "label", "probabilities"
#: OIP output of a regression model: one number per row.
PREDICTION = "prediction"
#: A model whose one-row forward takes at least this long runs its forward passes on the
#: forward thread's share of the cores (`Registry.torch_threads`); a lighter one on one
#: core: its operators are too small to split, and the idle intra-op threads only took CPU
#: from the event loop, while a heavy model's batches run nearly twice as fast on two
#: (docs/serving.md, bench/serving.py).
PARALLEL_ROW_SECONDS = 0.001


@dataclass(eq=False)
class Deployment:
    """One loaded version. `predict` is what the batcher's worker thread runs."""

    name: str
    version: str
    sha256: str
    model: nn.Module
    card: ModelCard
    load_seconds: float = 0.0
    #: One row's forward time, measured after the warm-up (decides the intra-op threads).
    row_seconds: float = 0.0
    features: list[str] = field(init=False)
    classes: np.ndarray = field(init=False)
    batcher: MicroBatcher | None = None

    def __post_init__(self) -> None:
        self.features = list(self.card.features)
        self.classes = np.asarray(self.card.classes, dtype=object)
        self.regression = self.card.task == "regression"
        self.sample_shape = self.card.sample_shape
        # Inputs are named columns (logged for drift, one value per feature), not a tensor
        # column whose values have no names of their own (its inputs are not logged).
        self.columns = self.card.input_shape is None
        self.outputs = (PREDICTION,) if self.regression else (LABEL, PROBABILITIES)
        # What the module is fed: one sample's shape for a plugin family, flat otherwise.
        self._feed = (-1, *resolve(self.card.family).feed_shape(self.sample_shape))
        # Built once: the hot path below is numpy on the card's arrays, no model objects.
        self._standardisation = self.card.standardisation
        self._target = (self.card.target_mean or 0.0, self.card.target_std or 1.0)

    @property
    def n_features(self) -> int:
        """Values per row of the flat input [rows, values] (a tensor's, flattened)."""
        return math.prod(self.sample_shape)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [rows, classes] of raw inputs [rows, values] (float32), or a
        regression model's predictions [rows, 1] in the target's units."""
        scaled = self._standardisation.apply(x).reshape(self._feed)
        import torch  # imported with the first model: a server with none holds no torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(scaled))
            if self.regression:
                mean, std = self._target
                return (out.reshape(-1, 1) * std + mean).numpy()
            return torch.softmax(out, dim=1).numpy()

    def labels(self, out: np.ndarray) -> np.ndarray:
        """Each row's answer: its class label, or its predicted number."""
        return out[:, 0] if self.regression else self.classes[out.argmax(axis=1)]

    def metadata(self) -> dict[str, Any]:
        inputs = [{"name": INPUT, "datatype": "FP32", "shape": [-1, *self.sample_shape]}]
        if self.regression:
            return {
                "inputs": inputs,
                "outputs": [{"name": PREDICTION, "datatype": "FP32", "shape": [-1, 1]}],
            }
        return {
            "inputs": inputs,
            "outputs": [
                {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(self.classes)]},
            ],
        }


def load_verified(
    store: ObjectStore, name: str, version: str, uri: str, sha256: str, card_uri: str | None
) -> Deployment:
    """Load a version and check it can serve: the weights hash to `sha256` (checked by
    `artifacts.load` before anything is deserialised; safetensors only), the card is valid
    (`ModelCard`: what serving needs, one mean and std per feature) and agrees with the
    weights, and a warm-up forward pass gives finite probabilities. Raises
    `VerificationFailed` with the reason otherwise: final, the same artifact never serves.
    A `TransientError` (the object store cannot be reached) is raised as it is: the caller
    may try again."""
    started = time.perf_counter()
    if not card_uri:
        raise VerificationFailed("the promotion's artifact has no model_card_uri")
    from mlbus import artifacts  # torch and Arrow, loaded with the first model

    try:
        model, card = artifacts.load(store, uri, sha256, card_uri)
    except TransientError:
        raise
    except MlbusError as e:  # artifacts.load translates what safetensors and torch raise
        raise VerificationFailed(f"{type(e).__name__}: {e}") from None
    deployment = Deployment(name, version, sha256, model, card)
    # One row of the training means (a tensor's one mean, in every value).
    row = np.asarray(card.mean, dtype=np.float32)
    typical = np.ascontiguousarray(np.broadcast_to(row, (1, deployment.n_features)))
    try:
        probabilities = deployment.predict(typical)
    except Exception as e:  # whatever torch raises: the version must not serve
        raise VerificationFailed(f"warm-up inference failed: {type(e).__name__}: {e}") from None
    if probabilities.shape != (1, card.n_outputs) or not np.isfinite(probabilities).all():
        raise VerificationFailed(f"warm-up inference gave {probabilities.shape}, not finite")
    timed = time.perf_counter()
    deployment.predict(typical)
    deployment.row_seconds = time.perf_counter() - timed
    deployment.load_seconds = time.perf_counter() - started
    return deployment


#: Requests are split in buckets of 1/BUCKETS: a weight in percent is weight * BUCKETS / 100
#: of them.
BUCKETS = 10_000


def bucket(rollout_id: str, key: str) -> int:
    """The bucket (0 to BUCKETS - 1) of a routing key in one rollout: a stable hash, the same
    on every replica and after a restart, so a caller with one key always lands on one
    version. Salted with the rollout, so each rollout draws its own cohort; within one, the
    candidate's buckets are the lowest, so a caller on the candidate at 10% stays on it at
    50%."""
    digest = hashlib.blake2b(f"{rollout_id}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class Route:
    """A model's split between its stable version and a candidate (model.traffic), as this
    replica applies it: `candidate_weight` percent of routing keys answered by the candidate,
    or, with `shadow`, every request answered by the stable version and copied to the
    candidate."""

    rollout_id: str
    strategy: str
    stable: str
    candidate: str
    candidate_weight: int
    shadow: bool = False

    def to_candidate(self, key: str) -> bool:
        weight = self.candidate_weight
        if weight <= 0:
            return False
        return weight >= 100 or bucket(self.rollout_id, key) < weight * BUCKETS // 100


@dataclass(frozen=True)
class Slot:
    current: Deployment
    previous: Deployment | None = None
    #: a rollout's candidate, loaded beside the champion while `route` splits requests
    candidate: Deployment | None = None
    route: Route | None = None

    def deployments(self) -> list[Deployment]:
        return [d for d in (self.current, self.previous, self.candidate) if d is not None]


class Registry:
    """Model name → `Slot`. A swap replaces the whole slot in one assignment, so a request
    sees either the old or the new slot, and a request that took a deployment keeps it until
    it is answered (in-flight requests finish on their version). The deployment pushed out
    (two versions back) is retired: its batcher drains what it holds, then stops.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_us: int,
        batching: bool = True,
        executor: Executor,
        torch_threads: int = 1,
        max_in_flight: int = 1,
        on_batch: Callable[[Deployment, int], None] | None = None,
        on_change: Callable[[str, Slot | None, Slot | None], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_us = max_wait_us
        self.batching = batching
        self.executor = executor
        self.torch_threads = torch_threads  # intra-op threads a forward thread may use
        self.max_in_flight = max_in_flight
        self.on_batch = on_batch
        self.on_change = on_change
        self.loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()  # serialises writers; readers need no lock

    def names(self) -> list[str]:
        return sorted(self._slots)

    def slot(self, name: str) -> Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise UnknownModel(f"model {name!r} is not served here") from None

    def find_slot(self, name: str) -> Slot | None:
        return self._slots.get(name)

    def current(self, name: str) -> Deployment | None:
        slot = self._slots.get(name)
        return slot.current if slot else None

    def get(self, name: str, version: str | None = None) -> Deployment:
        slot = self.slot(name)
        if version is None or version == slot.current.version:
            return slot.current
        for d in (slot.previous, slot.candidate):
            if d is not None and version == d.version:
                return d
        loaded = [d.version for d in slot.deployments()]
        raise UnknownVersion(
            f"model {name!r} has no version {version!r} loaded (loaded: {', '.join(loaded)})"
        )

    def choose(self, name: str, key: str) -> tuple[Deployment, Deployment | None]:
        """The deployment that answers a request for `name` with routing key `key`, and the
        one a copy goes to (a shadow candidate), from the slot's route; without a rollout,
        the champion and None."""
        slot = self.slot(name)
        route, candidate = slot.route, slot.candidate
        if route is None or candidate is None:
            return slot.current, None
        if route.shadow:
            return slot.current, candidate
        return (candidate if route.to_candidate(key) else slot.current), None

    def find(self, name: str, version: str, sha256: str) -> Deployment | None:
        """A loaded deployment of exactly that version and artifact (a rollback to the
        previous version, or the promotion of a rollout's candidate, is then a swap, not a
        reload)."""
        slot = self._slots.get(name)
        for d in slot.deployments() if slot else ():
            if d.version == version and d.sha256 == sha256:
                return d
        return None

    def install(self, deployment: Deployment, *, as_previous: bool = False) -> None:
        """Make `deployment` current (the current one becomes previous); with `as_previous`,
        put it behind the current one (loading a replica's history at start). A rollout
        whose candidate becomes current has ended: its route goes; a new champion that is
        not the route's stable version ends it too (the candidate is retired)."""
        self._batcher(deployment)
        with self._lock:
            old = self._slots.get(deployment.name)
            if as_previous and old is not None:
                new = Slot(old.current, deployment, old.candidate, old.route)
            elif old is None:
                new = Slot(deployment)
            else:
                keep = old.current if old.current is not deployment else old.previous
                route, candidate = old.route, old.candidate
                if candidate is deployment or route is None or route.stable != deployment.version:
                    route, candidate = None, None
                new = Slot(deployment, keep, candidate, route)
            self._slots[deployment.name] = new
        self._retire_dropped(old, new)
        if self.on_change:
            self.on_change(deployment.name, old, new)

    def route(self, name: str, route: Route | None, candidate: Deployment | None) -> None:
        """Set (or, with None, end) the rollout of `name`: its candidate loaded beside the
        champion and the route that splits requests. A candidate left out is retired."""
        if candidate is not None:
            self._batcher(candidate)
        with self._lock:
            old = self.slot(name)
            new = Slot(old.current, old.previous, candidate, route if candidate else None)
            self._slots[name] = new
        self._retire_dropped(old, new)
        if self.on_change:
            self.on_change(name, old, new)

    def _retire_dropped(self, old: Slot | None, new: Slot) -> None:
        kept = new.deployments()
        for d in old.deployments() if old else ():
            if not any(d is k for k in kept):
                self._retire(d)

    def _batcher(self, deployment: Deployment) -> None:
        if deployment.batcher is None:
            run = deployment.predict
            on_batch = self.on_batch
            heavy = deployment.row_seconds >= PARALLEL_ROW_SECONDS
            threads = self.torch_threads if heavy else 1

            import torch

            def forward(x: np.ndarray) -> np.ndarray:
                if on_batch is not None:
                    on_batch(deployment, len(x))
                if torch.get_num_threads() != threads:  # this thread's own setting
                    torch.set_num_threads(threads)
                return run(x)

            deployment.batcher = MicroBatcher(
                forward,
                max_batch_size=self.max_batch_size,
                max_wait_us=self.max_wait_us,
                executor=self.executor,
                batching=self.batching,
                max_in_flight=self.max_in_flight,
            )

    def remove(self, name: str) -> Slot | None:
        with self._lock:
            old = self._slots.pop(name, None)
        for d in old.deployments() if old else ():
            self._retire(d)
        if old is not None and self.on_change:
            self.on_change(name, old, None)
        return old

    def _retire(self, deployment: Deployment) -> None:
        batcher = deployment.batcher
        if batcher is None:
            return
        loop = self.loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(batcher.close)
        else:
            batcher.close()

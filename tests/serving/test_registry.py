"""The registry of loaded versions: a swap keeps the version it replaced, retires the one
before, and a request that had already picked a retired version still finishes on it."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from mlbus import artifacts
from mlbus.errors import UnknownModel
from mlbus.families import build, hyperparameters
from mlbus.ml.card import ModelCard
from mlbus.serving.errors import UnknownVersion, VerificationFailed
from mlbus.serving.registry import PARALLEL_ROW_SECONDS, Deployment, Registry, load_verified
from mlbus.storage import ObjectStore


def _deployment(version: str, weight: float) -> Deployment:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.copy_(torch.tensor([0.0, 3 * weight]))
    return Deployment("m", version, "sha256:" + version * 64, model.eval(), _card(std=[1.0, 0.0]))


def _card(std: list[float]) -> ModelCard:
    return ModelCard(
        family="mlp",
        hyperparameters={},
        features=["a", "b"],
        label="c",
        classes=["x", "y"],
        mean=[0.0, 0.0],
        std=std,
    )


def test_swaps_keep_the_previous_version_and_in_flight_requests_finish_on_theirs():
    with ThreadPoolExecutor(1) as pool:
        registry = Registry(max_batch_size=8, max_wait_us=0, executor=pool)
        d1, d2, d3 = (_deployment(v, w) for v, w in (("1", 1.0), ("2", -1.0), ("3", 0.5)))
        x = np.asarray([[1.0, 2.0]], dtype=np.float32)

        async def main() -> None:
            registry.loop = asyncio.get_running_loop()
            registry.install(d1)
            picked = registry.get("m")  # a request takes the champion...
            assert (await picked.batcher.infer(x)).shape == (1, 2)
            registry.install(d2)
            registry.install(d3)  # ...which is now two versions back, retired
            await asyncio.sleep(0)
            assert registry.get("m") is d3 and registry.get("m", "2") is d2
            with pytest.raises(UnknownVersion, match="loaded: 3, 2"):
                registry.get("m", "1")
            out = await picked.batcher.infer(x)  # still answered, by its own version
            assert np.allclose(out, d1.predict(x))
            assert not np.allclose(out, d3.predict(x))
            # A rollback to the previous version is a swap (no reload).
            assert registry.find("m", "2", d2.sha256) is d2
            registry.install(d2)
            assert registry.get("m") is d2 and registry.get("m", "3") is d3
            registry.remove("m")
            with pytest.raises(UnknownModel):
                registry.get("m")

        asyncio.run(main())


class _Threads(nn.Module):
    """Records the intra-op threads each forward pass ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.linear(x)


def test_a_heavy_model_forwards_on_the_threads_budget_a_light_one_on_one():
    card = _card(std=[1.0, 1.0])
    heavy = Deployment(
        "heavy",
        "1",
        "sha256:" + "1" * 64,
        _Threads().eval(),
        card,
        row_seconds=PARALLEL_ROW_SECONDS * 5,
    )
    light = Deployment(
        "light",
        "1",
        "sha256:" + "2" * 64,
        _Threads().eval(),
        card,
        row_seconds=PARALLEL_ROW_SECONDS / 5,
    )
    x = np.ones((1, 2), dtype=np.float32)
    with ThreadPoolExecutor(1) as pool:
        registry = Registry(max_batch_size=8, max_wait_us=0, executor=pool, torch_threads=3)

        async def main() -> None:
            registry.loop = asyncio.get_running_loop()
            registry.install(heavy)
            registry.install(light)
            for _ in range(2):  # alternating on the same thread
                await heavy.batcher.infer(x)
                await light.batcher.infer(x)

        asyncio.run(main())
    assert heavy.model.seen == [3, 3] and light.model.seen == [1, 1]


def test_a_card_that_is_not_a_model_card_fails_verification_naming_the_field(tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    params = hyperparameters("mlp", {"hidden": 4})
    card = _card(std=[1.0, 1.0]).model_copy(update={"hyperparameters": params})
    saved = artifacts.save(store, "m/1", build("mlp", 2, 2, params), card)
    args = (store, "m", "1", saved["uri"], saved["sha256"], saved["model_card_uri"])
    assert load_verified(*args).card.weights_sha256 == saved["sha256"]
    broken = json.loads(store.read_bytes("m/1/model_card.json"))
    broken["std"] = [1.0]
    store.write_bytes("m/1/model_card.json", json.dumps(broken).encode())
    with pytest.raises(VerificationFailed, match=r"InvalidModelCard: .*std: 1 values for 2"):
        load_verified(*args)

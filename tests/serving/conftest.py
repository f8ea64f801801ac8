"""Fixtures of the model server tests: digits models trained once per session (in-process,
a few epochs: accuracy is not the point), their artifacts on a local object store, a
`promote()` that publishes `model.promoted` as the workflow does, and a server run with
uvicorn in a thread on a free port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from mlbus import artifacts
from mlbus.kafka.config import KafkaConfig
from mlbus.ml.card import ModelCard
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import EventRef
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.training import Artifact
from mlbus.serving.app import create_app
from mlbus.serving.server import ModelServer
from mlbus.settings import ServingSettings
from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import publish, wait_until


@dataclass(frozen=True)
class Trained:
    model: Any
    card: ModelCard


@dataclass(frozen=True)
class Digits:
    x: np.ndarray  # raw pixels float32 [n, 64]
    y: np.ndarray
    v1: Trained
    v2: Trained


def _train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> Trained:
    from mlbus.trainer.data import prepare
    from mlbus.trainer.training import fit

    features = [f"pixel_{i}" for i in range(x.shape[1])]
    prepared = prepare(x, y, features=features, label="digit", seed=seed, validation=0.1, test=0.1)
    params = {"channels": 8, "dropout": 0.0, "lr": 3e-3, "batch_size": 64, "weight_decay": 0.0}
    result = fit(prepared, "cnn", params, max_epochs=epochs, seed=seed)
    mean, std = prepared.standardisation.to_lists()
    card = ModelCard(
        family="cnn",
        hyperparameters=params,
        features=features,
        feature_types=dict.fromkeys(features, "double"),
        label="digit",
        classes=prepared.classes,
        mean=mean,
        std=std,
        metrics=result.metrics,
        dataset=DatasetRef(name="digits", version="test"),
        run_id=f"run-{seed}",
    )
    return Trained(result.model, card)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    # Part of the data and few epochs: the tests need two different models, not good ones.
    return Digits(
        x, y, _train(x[:600], y[:600], seed=1, epochs=1), _train(x[:600], y[:600], seed=2, epochs=2)
    )


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore((tmp_path / "objects").as_uri())


def save(store: ObjectStore, trained: Trained, prefix: str) -> Artifact:
    return Artifact(**artifacts.save(store, prefix, trained.model, trained.card))


def promote(
    kafka: KafkaConfig, model: str, version: str, artifact: Artifact, **changes: Any
) -> EventRef:
    payload = ModelPromoted(
        model=model,
        version=version,
        reason="test",
        actor="tests",
        artifact=artifact,
        dataset=DatasetRef(name="digits", version="test"),
        **changes,
    )
    return publish(kafka, [payload])[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    server: ModelServer

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)

    def infer(self, model: str, rows: np.ndarray, version: str | None = None) -> httpx.Response:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        with self.client() as c:
            return c.post(path, json=body(rows))


def body(rows: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "shape": list(rows.shape),
                "datatype": datatype,
                "data": rows.reshape(-1).tolist(),
            }
        ]
    }


@contextmanager
def running(
    kafka: KafkaConfig,
    store: ObjectStore,
    *,
    api_token: str | None = None,
    stream_group: str | None = None,
    wait_ready: bool = True,
    log_queue_size: int | None = None,
    batching: bool = True,
    torch_threads: int | None = None,
    **config: Any,
) -> Iterator[Running]:
    """A model server (uvicorn in a thread) on a free port, replica `test-replica` unless
    `replica=` names another; stopped on exit."""
    port = free_port()
    defaults = {"host": "127.0.0.1", "replica": "test-replica"}
    settings = ServingSettings(**{**defaults, **config, "port": port})
    server = ModelServer(
        kafka,
        store,
        settings,
        api_token=api_token,
        stream_group=stream_group,
        log_queue_size=log_queue_size,
        batching=batching,
        torch_threads=torch_threads,
    )
    uv = uvicorn.Server(
        uvicorn.Config(
            create_app(server), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=uv.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: uv.started, "uvicorn to start")
        if wait_ready:
            wait_until(lambda: server.ready, "the server to catch up with model.promoted")
        yield Running(f"http://127.0.0.1:{port}", server)
    finally:
        uv.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    return wait_until(condition, what, timeout)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wait_version(srv: Running, model: str, version: str, timeout: float = 30.0) -> None:
    def serving() -> bool:
        current = srv.server.registry.current(model)
        return current is not None and current.version == version

    wait_until(serving, f"{model} {version} to serve", timeout)


def elapsed(since: float) -> float:
    return time.perf_counter() - since

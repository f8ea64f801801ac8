"""One serving replica, composed: the registry of loaded versions, the deployer that follows
`model.promoted` (and publishes `deployment.updated`), the stream inference consumer of
`inference.requests` (→ `inference.results`), the inference log (→ `inference.logged`) and
the metrics. The HTTP app (serving/app.py) and the stream consumer share `infer()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.settings import ServingSettings
from mlbus.storage import ObjectStore
from serving.deployer import Deployer
from serving.errors import ServingError
from serving.inference_log import InferenceLog, Sample
from serving.metrics import UNKNOWN, ServingMetrics
from serving.registry import Deployment, Registry, Slot

log = logging.getLogger(__name__)

SOURCE = "mlbus/serving"


@dataclass(frozen=True, slots=True)
class Answer:
    deployment: Deployment
    probabilities: np.ndarray
    labels: np.ndarray


def replica_id(configured: str) -> str:
    return configured or f"{socket.gethostname()}:{os.getpid()}"


class ModelServer:
    """Start with `start()` on the event loop that serves requests; `stop()` at shutdown.

    `batching=False` turns micro-batching off (one forward pass per request in a thread
    pool): the naive baseline of bench/serving.py. `stream_group` None runs no stream
    consumer."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        config: ServingSettings,
        *,
        api_token: str | None = None,
        batching: bool = True,
        stream_group: str | None = "mlbus-serving",
        log_queue_size: int | None = None,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.config = config
        self.api_token = api_token
        self.replica = replica_id(config.replica)
        self.metrics = ServingMetrics()
        # Micro-batching: one worker thread runs every forward pass (torch uses the cores
        # itself). Naive: a pool like a sync FastAPI endpoint's, one forward per request.
        workers = 1 if batching else min(32, (os.cpu_count() or 1) + 4)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="mlbus-forward")
        self.registry = Registry(
            max_batch_size=config.max_batch_size, max_wait_us=config.max_wait_us,
            batching=batching, executor=self.executor, on_batch=self._on_batch,
            on_change=self._on_change,
        )  # fmt: skip
        self._deploy_producer = EventProducer(kafka, source=SOURCE)
        self._log_producer = EventProducer(kafka, source=SOURCE)
        self.deployer = Deployer(
            kafka, store, self.registry, self._deploy_producer, replica=self.replica,
            on_outcome=lambda model, status: self.metrics.deployments.labels(model, status).inc(),
        )  # fmt: skip
        extra = {} if log_queue_size is None else {"queue_size": log_queue_size}
        self.inference_log = InferenceLog(
            self._log_producer, self.metrics, replica=self.replica,
            sample_rate=config.log_sample_rate, **extra,
        )  # fmt: skip
        self.stream_group = stream_group
        self.stream = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from serving.stream import StreamInference

        self.loop = loop
        self.registry.loop = loop
        self.inference_log.start()
        self.deployer.start()
        if self.stream_group is not None:
            self.stream = StreamInference(self, group=self.stream_group)
            self.stream.start()

    def stop(self) -> None:
        """Stop following the log and consuming requests, publish what the inference log
        holds, close the producers (each step bounded, so shutdown always ends)."""
        if self.stream is not None:
            self.stream.stop()
        self.deployer.stop()
        self.inference_log.close()
        for producer in (self._deploy_producer, self._log_producer):
            try:
                producer.close(5.0)
            except Exception as e:  # shutting down: report and go on
                log.warning("serving: closing a producer: %s", e)
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.deployer.ready.is_set()

    # -- inference -------------------------------------------------------------------------

    async def infer(
        self,
        deployment: Deployment,
        x: np.ndarray,
        *,
        protocol: str,
        request_id: str | None,
        started: float,
    ) -> Answer:
        """Run rows `x` through `deployment` (micro-batched), count and log the request."""
        assert deployment.batcher is not None
        try:
            probabilities = await deployment.batcher.infer(x)
        except Exception as e:
            self.failed(deployment.name, protocol, "model_error", started, deployment, x, e,
                        request_id)  # fmt: skip
            raise
        labels = deployment.classes[probabilities.argmax(axis=1)]
        latency = time.perf_counter() - started
        self.metrics.requests.labels(deployment.name, deployment.version, protocol).inc()
        self.metrics.latency.labels(deployment.name, protocol).observe(latency)
        self.inference_log.offer(
            Sample(deployment.name, deployment.version, request_id or str(uuid.uuid4()),
                   latency, True, None, labels, deployment.features, x)
        )  # fmt: skip
        return Answer(deployment, probabilities, labels)

    def failed(
        self,
        model: str | None,
        protocol: str,
        reason: str,
        started: float,
        deployment: Deployment | None = None,
        x: np.ndarray | None = None,
        error: BaseException | None = None,
        request_id: str | None = None,
    ) -> None:
        """Count a refused or failed request (and log it when its version is known)."""
        label = model if model is not None and model in self.registry.names() else UNKNOWN
        self.metrics.errors.labels(label, protocol, reason).inc()
        latency = time.perf_counter() - started
        self.metrics.latency.labels(label, protocol).observe(latency)
        if deployment is not None:
            message = str(error) if isinstance(error, ServingError) else repr(error)
            self.inference_log.offer(
                Sample(deployment.name, deployment.version, request_id or str(uuid.uuid4()),
                       latency, False, message, None, deployment.features, x)
            )  # fmt: skip

    # -- metrics hooks ---------------------------------------------------------------------

    def _on_batch(self, deployment: Deployment, rows: int) -> None:
        self.metrics.batch_size.labels(deployment.name, deployment.version).observe(rows)

    def _on_change(self, name: str, old: Slot | None, new: Slot | None) -> None:
        gauge = self.metrics.loaded
        for slot in (old,):
            if slot is None:
                continue
            for role, d in (("current", slot.current), ("previous", slot.previous)):
                if d is not None:
                    with contextlib.suppress(KeyError):
                        gauge.remove(name, d.version, role)
        if new is not None:
            gauge.labels(name, new.current.version, "current").set(1)
            if new.previous is not None:
                gauge.labels(name, new.previous.version, "previous").set(1)

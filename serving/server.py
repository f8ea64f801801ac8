"""One serving replica, composed: the registry of loaded versions, the deployer that follows
`model.promoted` and `model.traffic` (and publishes `deployment.updated`), the routing of a
request between a model's champion and a rollout's candidate (`route`: by a stable hash of
its routing key; a shadow candidate answers a copy, logged, never returned), the stream
inference consumer of
`inference.requests` (→ `inference.results`), the inference log (→ `inference.logged`) and
the metrics, and the feedback desk (→ `inference.feedback`, serving/feedback.py). The HTTP
app (serving/app.py) and the stream consumer share `infer()`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mlbus.errors import MlbusError, NotFound
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.runtime import usable_cores
from mlbus.schemas.envelope import new_event_id
from mlbus.services import service
from mlbus.serving.deployer import Deployer
from mlbus.serving.errors import NotReady
from mlbus.serving.feedback import FeedbackDesk
from mlbus.serving.inference_log import InferenceLog, Sample, producer_options
from mlbus.serving.metrics import NO_VERSION, UNKNOWN, ServingMetrics
from mlbus.serving.registry import Deployment, Registry, Slot
from mlbus.serving.stream import StreamInference
from mlbus.settings import ServingSettings
from mlbus.storage import ObjectStore

log = logging.getLogger(__name__)

SOURCE = service("serve").source  # its manifest: mlbus/services.py
#: The GIL switch interval while a server runs (CPython's default is 5 ms). The forward
#: thread takes the GIL back after every torch operator, and a busy event loop (or the
#: inference log's thread) keeps it for up to the switch interval each time: at the default,
#: a batch forward beside a busy Python thread takes several times as long as alone
#: (docs/serving.md).
SWITCH_INTERVAL = 0.0002
#: The cyclic garbage collector's first threshold while a server runs (CPython's default is
#: 700). A request holds a few dozen tracked objects (dicts, lists, tasks, futures) while it
#: is in flight; at 700 a collection ran every dozen or so requests, found the in-flight ones
#: alive and moved them to the older generations, and every few seconds that triggered a full
#: collection of the million-odd objects torch, FastAPI and pydantic leave at import, holding
#: the GIL for over 100 ms (docs/serving.md). Above what the requests in flight hold, a
#: collection runs only when garbage really accumulates.
GC_THRESHOLD = 10_000
#: Batches in flight per model with micro-batching, one per forward thread (see
#: serving/batcher.py): one, a heavy model's forward passes on every usable core. Two
#: batches on one core each (the next one gathering while one runs) left a lone batch on
#: half the cores, and the overlap gained nothing that one batch on both did not; a lone
#: batch taking both cores beside an idle second thread oversubscribed them once another
#: batch started; switching between the two by load lost at 64 clients (docs/serving.md).
PIPELINE = 1
#: Shadow copies in flight at most (each waits for the candidate's forward pass beside the
#: champion's): past this, a copy is dropped and counted, so that a slow candidate never
#: holds memory or delays the answers callers wait for.
MAX_SHADOW_IN_FLIGHT = 256
_gc_frozen = False


def tune_gc() -> None:
    """Raise the collector's first threshold to GC_THRESHOLD and, once per process, move
    what exists at a server's start (imports, the app: nothing it will retire) out of the
    collector's reach with `gc.freeze()`, so that a full collection walks only what was
    made since. Collected first, so that no garbage is frozen."""
    global _gc_frozen
    threshold, *older = gc.get_threshold()
    if 0 < threshold < GC_THRESHOLD:  # 0: automatic collection is off, and stays so
        gc.set_threshold(GC_THRESHOLD, *older)
    if not _gc_frozen:
        _gc_frozen = True
        gc.collect()
        gc.freeze()


def _torch_threads(n: int) -> None:
    # A forward thread starts with the first inference: torch is loaded by then (a model
    # is), and a server without a model never imports it.
    import torch

    torch.set_num_threads(n)


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
    consumer. `torch_threads`: intra-op threads of each forward thread for a heavy model
    (default: the usable cores divided among the forward threads; set per thread, so two
    servers in one process keep their own; a light model's forwards run on one)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        config: ServingSettings,
        *,
        api_token: str | None = None,
        batching: bool = True,
        stream_group: str | None = service("serve").group_id(),
        log_queue_size: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.config = config
        self.api_token = api_token
        self.replica = replica_id(config.replica)
        self.metrics = ServingMetrics()
        # Micro-batching: PIPELINE forward threads, one batch each, the usable cores shared
        # among their intra-op threads for a heavy model (registry.PARALLEL_ROW_SECONDS).
        # Naive: a pool like a sync FastAPI endpoint's, one forward per request, its threads
        # sharing the cores.
        self.forward_workers = PIPELINE if batching else min(32, (os.cpu_count() or 1) + 4)
        self.torch_threads = (
            torch_threads or config.torch_threads or max(1, usable_cores() // self.forward_workers)
        )
        self.executor = ThreadPoolExecutor(
            self.forward_workers,
            thread_name_prefix="mlbus-forward",
            initializer=_torch_threads,
            initargs=(self.torch_threads,),
        )
        self.registry = Registry(
            max_batch_size=config.max_batch_size,
            max_wait_us=config.max_wait_us,
            batching=batching,
            executor=self.executor,
            torch_threads=self.torch_threads,
            max_in_flight=self.forward_workers,
            on_batch=self._on_batch,
            on_change=self._on_change,
        )
        self._deploy_producer = EventProducer(kafka, source=SOURCE)
        self._log_producer = EventProducer(
            kafka, source=SOURCE, **producer_options(config.log_buffer_records)
        )
        self.deployer = Deployer(
            kafka,
            store,
            self.registry,
            self._deploy_producer,
            replica=self.replica,
            on_outcome=lambda model, status: self.metrics.deployments.labels(model, status).inc(),
            load_attempts=config.load_attempts,
            load_retry_seconds=config.load_retry_seconds,
        )
        self.inference_log = InferenceLog(
            self._log_producer,
            self.metrics,
            replica=self.replica,
            sample_rate=config.log_sample_rate,
            queue_size=log_queue_size or config.log_buffer_records,
        )
        self.feedback = FeedbackDesk(kafka, SOURCE)
        self.stream_group = stream_group
        self.stream: StreamInference | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._shadows: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.registry.loop = loop
        # Process-wide, and left so: a server owns its process (`mlbus serve`), and two
        # servers in one process (tests, the benchmark) want the same.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        tune_gc()  # before the deployer loads the first model (a deployment is never frozen)
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
        self.feedback.close()
        for producer in (self._deploy_producer, self._log_producer):
            try:
                producer.close(5.0)
            except Exception as e:  # shutting down: report and go on
                log.warning("serving: closing a producer: %s", e)
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        """Caught up with `model.promoted`: each model serves the newest version that loads,
        or its failure to load is reported."""
        return self.deployer.ready.is_set()

    def deployment(self, name: str, version: str | None = None) -> Deployment:
        """The loaded version that answers for `name` (its champion when `version` is None).
        `NotReady` (503, ask again) rather than not found while the server is catching up or
        is loading the model; not found once it is caught up and the model is not served."""
        try:
            return self.registry.get(name, version)
        except NotFound:
            if not self.ready:
                raise NotReady(
                    f"model {name!r} is not loaded yet: the server is catching up with "
                    "model.promoted"
                ) from None
            if self.deployer.loading(name):
                raise NotReady(f"model {name!r} is being loaded") from None
            raise

    def route(
        self, name: str, version: str | None, key: str
    ) -> tuple[Deployment, Deployment | None]:
        """The deployment that answers a request (a version asked for by name, else the
        champion or a rollout's candidate as the model's route has it for routing key
        `key`), and a shadow candidate that gets a copy (None without one)."""
        if version is not None:
            return self.deployment(name, version), None
        try:
            return self.registry.choose(name, key)
        except NotFound:
            self.deployment(name)  # NotReady while catching up or loading; else not found
            return self.registry.choose(name, key)

    # -- inference -------------------------------------------------------------------------

    async def infer(
        self,
        deployment: Deployment,
        x: np.ndarray,
        *,
        protocol: str,
        request_id: str | None,
        started: float,
        shadow: Deployment | None = None,
    ) -> Answer:
        """Run rows `x` through `deployment` (micro-batched), count and log the request; a
        `shadow` deployment gets a copy once it is answered (`mirror`)."""
        assert deployment.batcher is not None
        try:
            probabilities = await deployment.batcher.infer(x)
        except Exception as e:
            self.failed(
                deployment.name, protocol, "model_error", started, deployment, x, e, request_id
            )
            raise
        labels = deployment.labels(probabilities)
        latency = time.perf_counter() - started
        self._answered(deployment, protocol, latency)
        request_id = request_id or new_event_id()
        self.feedback.answered.add(
            request_id, deployment.name, deployment.version, deployment.classes
        )
        self._log(deployment, request_id, latency, x, True, labels=labels)
        answer = Answer(deployment, probabilities, labels)
        if shadow is not None:
            self.mirror(shadow, x, request_id, answer)
        return answer

    def mirror(self, shadow: Deployment, x: np.ndarray, request_id: str, answer: Answer) -> None:
        """Send a copy of an answered request to a shadow candidate, in the background (on
        the event loop): its answer is logged (`shadow`, with its agreement with the answer
        returned), never returned. Dropped and counted past MAX_SHADOW_IN_FLIGHT."""
        if len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
            self.metrics.shadow_dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(self._shadow(shadow, x, request_id, answer))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, deployment: Deployment, x: np.ndarray, request_id: str, answer: Answer
    ) -> None:
        assert deployment.batcher is not None
        started = time.perf_counter()
        returned = answer.deployment.version
        try:
            probabilities = await deployment.batcher.infer(x)
            labels = deployment.labels(probabilities)
        except Exception as e:  # the candidate's failure: logged as its own, never the caller's
            latency = time.perf_counter() - started
            self.metrics.refused(deployment.name, deployment.version, "shadow", "500", latency)
            self._log(
                deployment, request_id, latency, x, False, error=repr(e), status=500,
                shadow=True, answered_by=returned,
            )  # fmt: skip
            return
        latency = time.perf_counter() - started
        self._answered(deployment, "shadow", latency)
        agreement = float(np.mean(labels == answer.labels)) if len(labels) else None
        self._log(
            deployment, request_id, latency, x, True, labels=labels,
            shadow=True, answered_by=returned, agreement=agreement,
        )  # fmt: skip

    def _answered(self, deployment: Deployment, protocol: str, latency: float) -> None:
        """Count an answered request and its latency."""
        requests, latencies = self.metrics.answered(deployment.name, deployment.version, protocol)
        requests.inc()
        latencies.observe(latency)

    def _log(
        self,
        deployment: Deployment,
        request_id: str,
        latency: float,
        x: np.ndarray | None,
        ok: bool,
        *,
        labels: np.ndarray | None = None,
        error: str | None = None,
        status: int | None = None,
        shadow: bool = False,
        answered_by: str | None = None,
        agreement: float | None = None,
    ) -> None:
        """Offer a request's sample to the inference log (its inputs only where they are
        named columns: a tensor column's values have no names to watch for drift)."""
        self.inference_log.offer(
            Sample(
                deployment.name,
                deployment.version,
                request_id,
                latency,
                ok,
                error,
                labels,
                deployment.features,
                x if deployment.columns else None,
                status,
                shadow=shadow,
                answered_by=answered_by,
                agreement=agreement,
            )
        )

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
        code = str(error.status) if isinstance(error, MlbusError) else "500"
        version = deployment.version if deployment is not None else NO_VERSION
        self.metrics.refused(label, version, protocol, code, latency)
        if deployment is not None:
            message = str(error) if isinstance(error, MlbusError) else repr(error)
            # A refusal of the input (4xx) is the client's; anything else is ours.
            status = error.status if isinstance(error, MlbusError) else 500
            self._log(
                deployment, request_id or new_event_id(), latency, x, False,
                error=message, status=status,
            )  # fmt: skip

    # -- metrics hooks ---------------------------------------------------------------------

    def _on_batch(self, deployment: Deployment, rows: int) -> None:
        self.metrics.batch(deployment.name, deployment.version, rows)

    def _on_change(self, name: str, old: Slot | None, new: Slot | None) -> None:
        """The loaded gauge follows the slot; a version in neither role any more is retired
        and its series leave /metrics."""

        def roles(slot: Slot | None) -> dict[str, str]:
            if slot is None:
                return {}
            pairs = (
                ("current", slot.current),
                ("previous", slot.previous),
                ("candidate", slot.candidate),
            )
            return {d.version: role for role, d in pairs if d is not None}

        before, after = roles(old), roles(new)
        for version, role in before.items():
            if after.get(version) != role:
                self.metrics.unmark_loaded(name, version, role)
            if version not in after:
                self.metrics.retire(name, version)
        for version, role in after.items():
            self.metrics.mark_loaded(name, version, role)

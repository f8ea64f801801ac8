"""Stream inference: consumes `inference.requests` in a consumer group (each request is
answered by one replica) and produces one `inference.results` record per request, with the
same key (the request id), through the same models and micro-batchers as HTTP.

At-least-once with idempotent effects: the result is confirmed by the broker before the
request's offset is committed, and its event id is derived from the request's event id, so
a redelivered request produces a duplicate that consumers drop by id. A request that cannot
be answered (unknown model, bad tensor) gets a result with `error`, not a dead letter.
Replies go to `inference.results` or to a topic named `inference.results.<suffix>` (never
to any other topic of the contract).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from typing import Any, Protocol

import numpy as np

from mlbus.errors import MlbusError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import Tensor
from mlbus.schemas.codec import encode_new
from mlbus.schemas.envelope import Event
from mlbus.schemas.serving import InferenceRequest, InferenceResult
from mlbus.serving.deployer import Deployer
from mlbus.serving.errors import InvalidInput, NotReady
from mlbus.serving.registry import Deployment, Registry
from mlbus.serving.tensors import outputs, to_array

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("3f1c2d4e-5b6a-4f70-8e91-a2b3c4d5e6f7")
RESULTS = "inference.results"
_REPLY = re.compile(r"^inference\.results(\.[A-Za-z0-9._-]+)?$")
TIMEOUT = 60.0


class Server(Protocol):
    """What stream inference uses of the model server (serving/server.py's `ModelServer`,
    which starts it): declared here, so that this module does not import the server."""

    kafka: KafkaConfig
    registry: Registry
    deployer: Deployer
    loop: asyncio.AbstractEventLoop | None

    async def infer(
        self,
        deployment: Deployment,
        x: np.ndarray,
        *,
        protocol: str,
        request_id: str | None,
        started: float,
    ) -> Any: ...

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
    ) -> None: ...


class StreamInference:
    def __init__(self, server: Server, *, group: str) -> None:
        self.server = server
        self.kafka = server.kafka
        self.producer = EventProducer(server.kafka, source="mlbus/serving")
        self.loop = ConsumerLoop(
            server.kafka,
            group=group,
            handlers={"inference.requests": self.handle},
            name="serving-stream",
            commit_interval=0.5,
        )
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlbus-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Requests wait in Kafka until the champions in the log are loaded, rather than
        # being answered "unknown model" by a replica that is still starting.
        while not self.server.deployer.ready.wait(0.2):
            if self._stopping.is_set():
                return
        try:
            self.loop.run(install_signal_handlers=False)
        except Exception:
            log.exception("stream inference stopped")

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.loop.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.producer.close(5.0)
        except MlbusError as e:
            log.warning("stream inference: %s", e)

    def handle(self, event: Event[InferenceRequest], record: Record) -> None:
        """Answer one request (waits for the forward pass; see the module doc for effects)."""
        request: InferenceRequest = event.data
        started = time.perf_counter()
        reply = request.reply_topic or RESULTS
        if not _REPLY.match(reply):
            reply = RESULTS
            result = InferenceResult(
                request_id=request.request_id,
                model=request.model,
                error=f"reply_topic {request.reply_topic!r} must be {RESULTS} or "
                f"{RESULTS}.<suffix>",
            )
        else:
            result = self._answer(request, started)
        _, value = encode_new(
            result,
            source="mlbus/serving",
            causation=event,
            event_id=str(uuid.uuid5(_NAMESPACE, event.id)),
        )
        self.producer.produce(self.kafka.topic(reply), value, request.request_id)
        self.producer.flush(30.0)

    def _answer(self, request: InferenceRequest, started: float) -> InferenceResult:
        server = self.server
        deployment: Deployment | None = None
        x: np.ndarray | None = None
        try:
            deployment = server.registry.get(request.model, request.version)
            x = self._rows(request.inputs, deployment)
            loop = server.loop
            if loop is None:
                raise NotReady("the server is not running")
            answer = asyncio.run_coroutine_threadsafe(
                server.infer(
                    deployment, x, protocol="kafka", request_id=request.request_id, started=started
                ),
                loop,
            ).result(TIMEOUT)
        except MlbusError as e:  # a refusal (unknown model, bad input, not ready)
            server.failed(
                request.model,
                "kafka",
                type(e).__name__,
                started,
                deployment,
                x,
                e,
                request.request_id,
            )
            return InferenceResult(
                request_id=request.request_id,
                model=request.model,
                version=request.version,
                error=f"{type(e).__name__}: {e}",
                latency_seconds=time.perf_counter() - started,
            )
        except Exception as e:  # the model failed: answered as an error, not a dead letter
            return InferenceResult(
                request_id=request.request_id,
                model=request.model,
                version=request.version,
                error=f"inference failed: {e!r}",
                latency_seconds=time.perf_counter() - started,
            )
        tensors, _ = outputs(answer.deployment, answer.probabilities, labels=answer.labels)
        return InferenceResult(
            request_id=request.request_id,
            model=request.model,
            version=answer.deployment.version,
            outputs=[
                Tensor(
                    name=t["name"], shape=t["shape"], datatype=t["datatype"], data=_plain(t["data"])
                )
                for t in tensors
            ],
            latency_seconds=time.perf_counter() - started,
        )

    @staticmethod
    def _rows(inputs: list[Tensor], deployment: Deployment) -> np.ndarray:
        if len(inputs) != 1:
            raise InvalidInput(f"the model takes one input, got {[t.name for t in inputs]}")
        t = inputs[0]
        return to_array(deployment, t.name, list(t.shape), t.datatype, t.data)


def _plain(data: np.ndarray | list[float | int | bool | str]) -> list[float | int | bool | str]:
    return data.tolist() if hasattr(data, "tolist") else list(data)

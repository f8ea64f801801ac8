"""Stream inference: consumes `inference.requests` in a consumer group (each request is
answered by one replica) and produces one `inference.results` record per request, with the
same key (the request id), through the same models and micro-batchers as HTTP.

At-least-once with idempotent effects: the result is confirmed by the broker before the
request's offset is committed, and its event id is derived from the request's event id, so
a redelivered request produces a duplicate that consumers drop by id. A request that cannot
be answered (unknown model, bad tensor, a reply topic it may not use) gets a result with
`error`, not a dead letter; a request id over serving.max_request_id_bytes is dead-lettered
(echoing it would make the oversized records it is refused for). A model that is being
loaded is HTTP's 503: the request is retried with backoff (the consumer stays in its group,
nothing is committed) until the load ends, then answered or refused as HTTP would.

Replies go to `inference.results` or to an existing topic named `<reply_topic_prefix>
<suffix>` (serving.reply_topic_prefix, `inference.results.` by default), never to another
topic of the contract, and never to a topic that does not exist: the reply producer does not
create topics (`allow.auto.create.topics` false, and the topic is looked up in the cluster's
metadata first, since a broker may create a topic on a produce request alone).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
import uuid
from typing import Any, Protocol

import numpy as np

from mlbus.errors import InvalidEvent, MlbusError, TransientError
from mlbus.kafka.admin import topic_names
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import Tensor
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import encode_new
from mlbus.schemas.envelope import Event
from mlbus.schemas.serving import InferenceRequest, InferenceResult
from mlbus.serving.deployer import Deployer
from mlbus.serving.errors import InvalidInput, NotReady
from mlbus.serving.registry import Deployment, Registry
from mlbus.serving.tensors import check_request_id, outputs, show, to_array
from mlbus.settings import ServingSettings

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("3f1c2d4e-5b6a-4f70-8e91-a2b3c4d5e6f7")
RESULTS = "inference.results"
_SUFFIX = re.compile(r"[A-Za-z0-9._-]+")
TIMEOUT = 60.0
#: The most often the cluster's topic list is read again for a reply topic not seen yet.
TOPICS_REFRESH_SECONDS = 1.0
#: The most characters of an error answered on inference.results.
MAX_ERROR_CHARS = 1024


class Server(Protocol):
    """What stream inference uses of the model server (serving/server.py's `ModelServer`,
    which starts it): declared here, so that this module does not import the server."""

    kafka: KafkaConfig
    config: ServingSettings
    registry: Registry
    deployer: Deployer
    loop: asyncio.AbstractEventLoop | None

    def deployment(self, name: str, version: str | None = None) -> Deployment: ...

    def route(
        self, name: str, version: str | None, key: str
    ) -> tuple[Deployment, Deployment | None]: ...

    async def infer(
        self,
        deployment: Deployment,
        x: np.ndarray,
        *,
        protocol: str,
        request_id: str | None,
        started: float,
        shadow: Deployment | None = None,
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
        self.config = server.config
        # Never create a topic by producing to it (a reply topic is checked to exist first).
        self.producer = EventProducer(
            server.kafka, source="mlbus/serving", **{"allow.auto.create.topics": False}
        )
        self._topics: set[str] = set()
        self._topics_read = -math.inf
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
        """Answer one request (waits for the forward pass; see the module doc for effects).
        `NotReady` (the model is loading) propagates: the loop retries the request."""
        request: InferenceRequest = event.data
        started = time.perf_counter()
        try:
            check_request_id(request.request_id, self.config.max_request_id_bytes)
        except MlbusError as e:
            raise InvalidEvent(str(e)) from None
        reply, refusal = self._reply_topic(request.reply_topic)
        if refusal is not None:
            result = InferenceResult(
                request_id=request.request_id, model=request.model, error=refusal
            )
        else:
            result = self._answer(request, started)
        _, value = encode_new(
            result,
            source="mlbus/serving",
            causation=event,
            event_id=str(uuid.uuid5(_NAMESPACE, event.id)),
        )
        self.producer.produce(reply, value, request.request_id)
        self.producer.flush(30.0)

    def _reply_topic(self, name: str | None) -> tuple[str, str | None]:
        """The topic to answer on and, for a reply topic the request may not use, why (the
        refusal is answered on inference.results)."""
        results = self.kafka.topic(RESULTS)
        if name is None or name == RESULTS:
            return results, None
        prefix = self.config.reply_topic_prefix
        suffix = name[len(prefix) :] if name.startswith(prefix) else ""
        if not suffix or not _SUFFIX.fullmatch(suffix) or name in TOPICS or len(name) > 200:
            return results, (
                f"reply_topic {show(name)} must be {RESULTS} or {prefix}<suffix> "
                "(letters, digits, '.', '_', '-'; serving.reply_topic_prefix)"
            )
        topic = self.kafka.topic(name)
        if not self._exists(topic):
            return results, (
                f"reply_topic {name!r} does not exist: create it before asking "
                "(stream inference never creates topics)"
            )
        return topic, None

    def _exists(self, topic: str) -> bool:
        """Whether `topic` is in the cluster's topic list (read again at most every
        TOPICS_REFRESH_SECONDS when a topic is not in it: a flood of requests naming missing
        topics costs one metadata request a second). Listing every topic never creates one."""
        if topic in self._topics:
            return True
        now = time.monotonic()
        if now - self._topics_read < TOPICS_REFRESH_SECONDS:
            return False
        self._topics_read = now
        try:
            self._topics = topic_names(self.kafka)
        except TransientError as e:
            log.warning("stream inference: cannot list topics: %s", e)
            return False
        return topic in self._topics

    def _answer(self, request: InferenceRequest, started: float) -> InferenceResult:
        server = self.server
        deployment: Deployment | None = None
        x: np.ndarray | None = None
        try:
            # During a rollout the request id is the routing key: a redelivered request
            # lands on the version that answered it the first time.
            deployment, shadow = server.route(request.model, request.version, request.request_id)
            x = self._rows(request.inputs, deployment, self.config.max_rows_per_request)
            loop = server.loop
            if loop is None:
                raise NotReady("the server is not running")
            answer = asyncio.run_coroutine_threadsafe(
                server.infer(
                    deployment,
                    x,
                    protocol="kafka",
                    request_id=request.request_id,
                    started=started,
                    shadow=shadow,
                ),
                loop,
            ).result(TIMEOUT)
        except NotReady:  # loading, or stopping: HTTP's 503; the loop asks again
            raise
        except MlbusError as e:  # a refusal (unknown model, bad input)
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
                error=_clip(f"{type(e).__name__}: {e}"),
                latency_seconds=time.perf_counter() - started,
            )
        except Exception as e:  # the model failed: answered as an error, not a dead letter
            return InferenceResult(
                request_id=request.request_id,
                model=request.model,
                version=request.version,
                error=_clip(f"inference failed: {e!r}"),
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
    def _rows(inputs: list[Tensor], deployment: Deployment, max_rows: int) -> np.ndarray:
        if len(inputs) != 1:
            names = [t.name for t in inputs]
            raise InvalidInput(f"the model takes one input, got {len(names)}: {show(names)}")
        t = inputs[0]
        return to_array(deployment, t.name, list(t.shape), t.datatype, t.data, max_rows=max_rows)


def _clip(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


def _plain(data: np.ndarray | list[float | int | bool | str]) -> list[float | int | bool | str]:
    return data.tolist() if hasattr(data, "tolist") else list(data)

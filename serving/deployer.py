"""Model lifecycle from the log: a log view of `model.promoted` (mlbus/kafka/logview.py) read
from the beginning (newest promotion per model = its champion, the one before = its previous
version), loads those, then follows the topic group-less, so every replica sees every
promotion. Publishes `deployment.updated` for each load (loaded or failed).

A promoted version is loaded and verified beside the serving one and swapped in only when
it passed (serving/registry.py). Effects are idempotent: a redelivered promotion of the
version already serving changes nothing, and each `deployment.updated` has an id derived
from the replica and the promotion's event id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

from mlbus.errors import MlbusError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView, Positioned
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.serving.errors import VerificationFailed
from mlbus.serving.registry import Deployment, Registry, load_verified
from mlbus.storage import ObjectStore

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6a0d0f0e-8f53-4c55-9a1d-2b36c1e0b7a1")
TOPIC = "model.promoted"


class Deployer:
    """Runs in its own thread (`start()` / `stop()`); `ready` is set once the champions that
    were in the log at start are loaded (or have failed to load). `champion()` answers from
    the same view, caught up to the end of the log first."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        registry: Registry,
        producer: EventProducer,
        *,
        replica: str,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.registry = registry
        self.producer = producer
        self.replica = replica
        self.on_outcome = on_outcome
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._history: dict[str, list[Event[ModelPromoted]]] = {}  # model → last two versions
        self._following = False  # promotions folded from now on are new: handled as they come
        self._pending: list[Event[ModelPromoted]] = []
        self.view = LogView(kafka, [TOPIC], on_event=self._fold, name="deployer")

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlbus-deployer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.view.stop(timeout)

    def champion(self, name: str) -> Event[ModelPromoted] | None:
        """The newest promotion of `name` as the log has it now (None: never promoted)."""
        self.view.catch_up()
        with self._lock:
            events = self._history.get(name)
            return events[-1] if events else None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if not self.ready.is_set():
                    self._catch_up()
                    self.ready.set()
                while not self._stop.is_set():
                    self.view.poll()
                    with self._lock:
                        new, self._pending = self._pending, []
                    for event in new:
                        self.handle(event)
                return
            except MlbusError as e:  # broker or store away: retry from where we are
                log.warning("deployer: %s (retrying in %.1fs)", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                log.exception("deployer: unexpected error (retrying)")
                self._stop.wait(delay)

    def _fold(self, item: Positioned) -> None:
        event: Event[ModelPromoted] = item.event
        with self._lock:
            versions = self._history.setdefault(event.data.model, [])
            versions[:] = [e for e in versions if e.data.version != event.data.version][-1:]
            versions.append(event)
            if self._following:
                self._pending.append(event)

    def _catch_up(self) -> None:
        """Read the topic to its end; load each model's champion and the version before."""
        self.view.catch_up()
        with self._lock:  # what came after this is handled by the following loop
            history = {name: list(events) for name, events in self._history.items()}
            self._following = True
        for name, events in history.items():
            if self._stop.is_set():
                return
            if len(events) > 1:  # so that /versions/{previous}/infer works after a restart
                self.handle(events[-2], initial_previous=True)
            self.handle(events[-1])
            log.info("deployer: %s caught up at version %s", name, events[-1].data.version)

    # -- one promotion ---------------------------------------------------------------------

    def handle(
        self, event: Event[ModelPromoted], *, initial_previous: bool = False
    ) -> Deployment | None:
        """Load, verify and swap in the promoted version; report the outcome."""
        promoted: ModelPromoted = event.data
        artifact = promoted.artifact
        name, version = promoted.model, promoted.version
        if artifact is None:
            self._report(event, "failed", error="the promotion carries no artifact to load")
            return None
        if not initial_previous:
            current = self.registry.current(name)
            if current and current.version == version and current.sha256 == artifact.sha256:
                return current  # a redelivered or repeated promotion: nothing to do
        started = time.perf_counter()
        deployment = self.registry.find(name, version, artifact.sha256)
        if deployment is None:
            try:
                deployment = load_verified(
                    self.store,
                    name,
                    version,
                    artifact.uri,
                    artifact.sha256,
                    artifact.model_card_uri,
                )
            except VerificationFailed as e:
                log.warning("deployer: %s version %s refused: %s", name, version, e)
                self._report(
                    event,
                    "failed",
                    error=str(e),
                    sha256=artifact.sha256,
                    seconds=time.perf_counter() - started,
                )
                return None
        self.registry.install(deployment, as_previous=initial_previous)
        seconds = time.perf_counter() - started
        log.info(
            "deployer: %s version %s %s in %.3fs",
            name,
            version,
            "loaded" if initial_previous else "serving",
            seconds,
        )
        self._report(event, "loaded", sha256=artifact.sha256, seconds=seconds)
        return deployment

    def report_unloaded(self, deployment: Deployment) -> None:
        """Publish that this replica stopped serving `deployment` (a control request)."""
        self.producer.publish(
            DeploymentUpdated(
                model=deployment.name,
                version=deployment.version,
                replica=self.replica,
                status="unloaded",
                artifact_sha256=deployment.sha256,
            )
        )
        self.producer.flush(10.0)

    def _report(
        self,
        event: Event[ModelPromoted],
        status: Literal["loaded", "failed"],
        *,
        error: str | None = None,
        sha256: str | None = None,
        seconds: float | None = None,
    ) -> None:
        promoted: ModelPromoted = event.data
        if self.on_outcome:
            self.on_outcome(promoted.model, status)
        update = DeploymentUpdated(
            model=promoted.model,
            version=promoted.version,
            replica=self.replica,
            status=status,
            load_seconds=seconds,
            artifact_sha256=sha256,
            error=error,
        )
        event_id = str(uuid.uuid5(_NAMESPACE, f"{self.replica}/{event.id}/{status}"))
        try:
            self.producer.publish(update, causation=event, event_id=event_id)
            self.producer.flush(10.0)
        except MlbusError as e:  # the load itself stands; the report is best effort
            log.warning("deployer: cannot publish deployment.updated: %s", e)

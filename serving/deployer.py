"""Model lifecycle from the log: a log view of `model.promoted` and `model.traffic`
(mlbus/kafka/logview.py) read from the beginning (newest promotion per model = its champion;
newest traffic event per model = its rollout, if one is in progress), loads what it can, then
follows both topics group-less, so every replica sees every promotion and every change of
weights. Reads `deployment.updated` once at start (what this replica already reported);
publishes `deployment.updated` for each load (loaded or failed).

A rollout's candidate (`model.traffic`) is loaded and verified beside the champion, then the
route that splits requests is set in one swap (serving/registry.py); a candidate that cannot
load is reported failed and the split is not applied: every request stays on the champion.
A completed rollout leaves its candidate loaded for the `model.promoted` that follows it (a
swap, not a reload); an aborted one retires it.

A promoted version is loaded and verified beside the serving one and swapped in only when
it passed (serving/registry.py). A version that cannot load (not safetensors, hash mismatch,
unknown family, bad card, failed warm-up) is final: one `failed` deployment.updated with the
reason, the serving version goes on, the promotion is never tried again by this process.
Only an object store out of reach (`TransientError`) is tried again, with backoff, up to
`load_attempts` times; then the version is failed too.

After a restart each model serves the newest promoted version that loads, walking back from
the champion, with the next one that loads as its previous version. A champion this replica
already reported failed (deployment.updated of the same replica id) is not tried again; one
it has no report of is tried once. Effects are idempotent: a redelivered promotion of the
version already serving changes nothing, and each `deployment.updated` has an id derived
from the replica and the promotion's event id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal, cast

from mlbus.errors import Abandon, MlbusError, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView, Positioned
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.schemas.traffic import ModelTraffic, inconsistency
from mlbus.schemas.training import Artifact
from mlbus.serving.errors import VerificationFailed
from mlbus.serving.registry import Deployment, Registry, Route, load_verified
from mlbus.storage import ObjectStore

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6a0d0f0e-8f53-4c55-9a1d-2b36c1e0b7a1")
TOPIC = "model.promoted"
TRAFFIC = "model.traffic"
OUTCOMES = "deployment.updated"
#: The longest wait between two tries of a load while the object store is out of reach.
MAX_RETRY_SECONDS = 30.0
#: How the reason of a version failed because the object store stayed out of reach begins:
#: such a failure is not final across restarts (a restarted replica tries it again).
UNREACHABLE = "the object store could not be reached"


class Deployer:
    """Runs in its own thread (`start()` / `stop()`); `ready` is set once the champions that
    were in the log at start are loaded or reported failed (each model then serves the newest
    version that loads). `champion()` answers from the same view, caught up to the end of
    the log first."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        registry: Registry,
        producer: EventProducer,
        *,
        replica: str,
        on_outcome: Callable[[str, str], None] | None = None,
        load_attempts: int = 5,
        load_retry_seconds: float = 0.5,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.registry = registry
        self.producer = producer
        self.replica = replica
        self.on_outcome = on_outcome
        self.load_attempts = load_attempts
        self.load_retry_seconds = load_retry_seconds
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # model → its promotions, one per version, oldest first (a re-promoted version moves
        # to the end): what a restart walks back through when the champion cannot load.
        self._history: dict[str, list[Event[ModelPromoted]]] = {}
        # model → its newest model.traffic event (in progress or ended)
        self._traffic: dict[str, Event[ModelTraffic]] = {}
        self._following = False  # events folded from now on are new: handled as they come
        self._pending: list[Event[ModelPromoted] | Event[ModelTraffic]] = []
        self._failed: dict[str, str] = {}  # promotion event id → why it cannot serve here
        self._loading: set[str] = set()  # models with a load under way
        self.view = LogView(kafka, [TOPIC, TRAFFIC], on_event=self._fold, name="deployer")

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

    def traffic(self, name: str) -> Event[ModelTraffic] | None:
        """The newest `model.traffic` event of `name` as this replica has read it."""
        with self._lock:
            return self._traffic.get(name)

    def loading(self, name: str) -> bool:
        """Whether a version of `name` is being loaded now (the server answers 503, not 404,
        for a model it does not serve yet)."""
        return name in self._loading

    def failure(self, event: Event[ModelPromoted]) -> str | None:
        """Why the promotion `event` cannot serve on this replica (None: not known to fail)."""
        return self._failed.get(event.id)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if not self.ready.is_set():
                    self._catch_up()
                    if self._stop.is_set():
                        return
                    self.ready.set()
                while not self._stop.is_set():
                    self.view.poll()
                    while True:  # one at a time: nothing folded is dropped if one goes wrong
                        with self._lock:
                            if not self._pending:
                                break
                            event = self._pending.pop(0)
                        if event.type == TRAFFIC:
                            self.handle_traffic(cast("Event[ModelTraffic]", event))
                        else:
                            self.handle(cast("Event[ModelPromoted]", event))
                return
            except MlbusError as e:  # broker or store away: retry from where we are
                log.warning("deployer: %s (retrying in %.1fs)", e, delay)
            except Exception:
                log.exception("deployer: unexpected error (retrying in %.1fs)", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def _fold(self, item: Positioned) -> None:
        if item.event.type == TRAFFIC:
            traffic: Event[ModelTraffic] = item.event
            with self._lock:
                self._traffic[traffic.data.model] = traffic
                if self._following:
                    self._pending.append(traffic)
            return
        event: Event[ModelPromoted] = item.event
        with self._lock:
            versions = self._history.setdefault(event.data.model, [])
            versions[:] = [e for e in versions if e.data.version != event.data.version]
            versions.append(event)
            if self._following:
                self._pending.append(event)

    def _catch_up(self) -> None:
        """Learn what this replica already reported failed, read `model.promoted` to its end,
        and serve each model's newest version that loads (and the one before it)."""
        self._failed.update(self._reported_failures())
        self.view.catch_up()
        with self._lock:  # what came after this is handled by the following loop
            history = {name: list(events) for name, events in self._history.items()}
            rollouts = [e for e in self._traffic.values() if e.data.active]
            self._following = True
        for name, events in history.items():
            serving = self._serve_newest(events)
            if self._stop.is_set():
                return
            if serving is None:
                log.warning("deployer: %s caught up, no promoted version loads", name)
            else:
                log.info("deployer: %s caught up at version %s", name, serving.version)
        for traffic in rollouts:  # each rollout in progress, beside its champion
            if self._stop.is_set():
                return
            self.handle_traffic(traffic)

    def _serve_newest(self, events: list[Event[ModelPromoted]]) -> Deployment | None:
        """Walk back from the champion: the first version that loads serves, the next one
        that loads becomes its previous version (so /versions/{previous}/infer works after a
        restart). Each is tried once; a failure is reported, not retried."""
        serving: Deployment | None = None
        for event in reversed(events):
            if self._stop.is_set():
                break
            deployment = self.handle(event, initial_previous=serving is not None)
            if deployment is None:
                continue
            if serving is not None:
                break
            serving = deployment
        return serving

    def _reported_failures(self) -> dict[str, str]:
        """Promotions this replica already reported it cannot load, by the promotion's event
        id, from `deployment.updated`: a restart does not try them again. A failure because
        the store was out of reach is left out (it may load now), and so is one loaded later.
        A replica id that changes with each process finds nothing: each champion is then
        tried once."""
        failed: dict[str, str] = {}

        def fold(item: Positioned) -> None:
            event: Event[DeploymentUpdated] = item.event
            update = event.data
            if update.replica != self.replica or not event.causationid:
                return
            error = update.error or "failed"
            if update.status == "failed" and not error.startswith(UNREACHABLE):
                failed[event.causationid] = error
            elif update.status == "loaded":
                failed.pop(event.causationid, None)

        view = LogView(self.kafka, [OUTCOMES], on_event=fold, name="deployer outcomes")
        try:
            view.catch_up()
        finally:
            view.stop()
        return failed

    # -- one promotion ---------------------------------------------------------------------

    def handle(
        self, event: Event[ModelPromoted], *, initial_previous: bool = False, again: bool = False
    ) -> Deployment | None:
        """Load, verify and swap in the promoted version; report the outcome. None: it cannot
        serve (reported once; a promotion that failed is not tried again unless `again`)."""
        promoted: ModelPromoted = event.data
        artifact = promoted.artifact
        name, version = promoted.model, promoted.version
        if not again and event.id in self._failed:
            return None
        if artifact is None:
            self._fail(event, "the promotion carries no artifact to load")
            return None
        existing = self.registry.find(name, version, artifact.sha256)
        if existing is not None and (
            initial_previous or existing is self.registry.current(name)
        ):  # a redelivered or repeated promotion, or a catch-up tried again: nothing to do
            return existing
        started = time.perf_counter()
        self._loading.add(name)
        try:
            deployment = existing or self._load(name, version, artifact)
            self.registry.install(deployment, as_previous=initial_previous)
        except Abandon:  # stopping: neither loaded nor failed
            return None
        except VerificationFailed as e:
            self._fail(event, str(e), sha256=artifact.sha256, started=started)
            return None
        except Exception as e:  # untranslated: still final, never a retry storm
            log.exception("deployer: %s version %s: unexpected error", name, version)
            reason = f"unexpected error: {type(e).__name__}: {e}"
            self._fail(event, reason, sha256=artifact.sha256, started=started)
            return None
        finally:
            self._loading.discard(name)
        self._failed.pop(event.id, None)
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

    # -- one change of weights -------------------------------------------------------------

    def handle_traffic(self, event: Event[ModelTraffic]) -> Deployment | None:
        """Apply a `model.traffic` event: load and verify its candidate beside the champion
        (reported like a promotion's load), then set the route in one swap. An ended rollout
        clears the route (a completed one keeps its candidate loaded for the promotion that
        follows). The candidate loaded, or None when no split applies."""
        traffic: ModelTraffic = event.data
        name = traffic.model
        problem = inconsistency(traffic)
        if problem is not None:  # published by other means than mlbus's checks
            log.warning("deployer: %s: model.traffic %s ignored: %s", name, event.id, problem)
            return None
        slot = self.registry.find_slot(name)
        if not traffic.active:
            if slot is not None and slot.route is not None:
                # completed: loaded beside the champion, unrouted, until it is promoted
                keep = slot.candidate if traffic.status == "completed" else None
                self.registry.route(name, None, keep)
                log.info("deployer: %s rollout %s %s", name, traffic.rollout_id, traffic.status)
            return None
        if event.id in self._failed:
            return None
        if slot is None:
            log.warning(
                "deployer: %s rollout of %s: the model is not served here; nothing to split",
                name,
                traffic.candidate,
            )
            return None
        artifact = traffic.artifact
        if artifact is None:
            self._fail(event, "the rollout carries no artifact of its candidate to load")
            return None
        existing = self.registry.find(name, traffic.candidate, artifact.sha256)
        started = time.perf_counter()
        if existing is None:
            self._loading.add(name)
            try:
                existing = self._load(name, traffic.candidate, artifact)
            except Abandon:
                return None
            except VerificationFailed as e:
                self._fail(event, str(e), sha256=artifact.sha256, started=started)
                return None
            except Exception as e:  # untranslated: final, as for a promotion
                log.exception(
                    "deployer: %s candidate %s: unexpected error", name, traffic.candidate
                )
                reason = f"unexpected error: {type(e).__name__}: {e}"
                self._fail(event, reason, sha256=artifact.sha256, started=started)
                return None
            finally:
                self._loading.discard(name)
            seconds = time.perf_counter() - started
            self._report(event, "loaded", sha256=artifact.sha256, seconds=seconds)
        route = Route(
            rollout_id=traffic.rollout_id,
            strategy=traffic.strategy,
            stable=traffic.stable,
            candidate=traffic.candidate,
            candidate_weight=0 if traffic.shadow else traffic.weight(traffic.candidate),
            shadow=traffic.shadow,
        )
        self.registry.route(name, route, existing)
        log.info(
            "deployer: %s %s rollout %s: %s",
            name,
            traffic.strategy,
            traffic.rollout_id,
            "shadow" if traffic.shadow else traffic.weights,
        )
        return existing

    def _load(self, name: str, version: str, artifact: Artifact) -> Deployment:
        """`load_verified`, tried again with backoff while the object store is out of reach;
        `VerificationFailed` once `load_attempts` tries met a `TransientError`."""
        delay = self.load_retry_seconds
        attempt = 1
        while True:
            try:
                return load_verified(
                    self.store,
                    name,
                    version,
                    artifact.uri,
                    artifact.sha256,
                    artifact.model_card_uri,
                )
            except TransientError as e:
                if attempt >= self.load_attempts:
                    raise VerificationFailed(f"{UNREACHABLE} in {attempt} attempts: {e}") from None
                log.warning(
                    "deployer: %s version %s: %s (attempt %d of %d; again in %.1fs)",
                    name,
                    version,
                    e,
                    attempt,
                    self.load_attempts,
                    delay,
                )
            if self._stop.wait(delay):
                raise Abandon(f"stopping while loading {name} version {version}")
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            attempt += 1

    def _fail(
        self,
        event: Event[ModelPromoted] | Event[ModelTraffic],
        reason: str,
        *,
        sha256: str | None = None,
        started: float | None = None,
    ) -> None:
        """Remember that the promotion (or rollout) cannot serve here and report it, once."""
        model, version = _target(event)
        log.warning("deployer: %s version %s cannot serve: %s", model, version, reason)
        self._failed[event.id] = reason
        seconds = None if started is None else time.perf_counter() - started
        self._report(event, "failed", error=reason, sha256=sha256, seconds=seconds)

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
        event: Event[ModelPromoted] | Event[ModelTraffic],
        status: Literal["loaded", "failed"],
        *,
        error: str | None = None,
        sha256: str | None = None,
        seconds: float | None = None,
    ) -> None:
        model, version = _target(event)
        if self.on_outcome:
            self.on_outcome(model, status)
        update = DeploymentUpdated(
            model=model,
            version=version,
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


def _target(event: Event[ModelPromoted] | Event[ModelTraffic]) -> tuple[str, str]:
    """The model and the version an event asks this replica to load."""
    data = event.data
    if isinstance(data, ModelTraffic):
        return data.model, data.candidate
    return data.model, data.version

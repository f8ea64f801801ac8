"""The workflow service (`mlbus workflow`): one consumer group that runs the training
trigger (`dataset.validated` → `training.requested`, debounced by a timer), the promotion
policy (`training.completed` / `training.failed` → `model.promoted` or `model.rejected`, or
`model.traffic` starting a rollout when the pipeline has a `rollout:` plan and a champion
serves), canary steps (`serving.metrics` / `serving.accuracy` windows of both versions →
`model.traffic` advanced, aborted or completed, then `model.promoted` of the candidate:
rollout.py) and automatic rollback (`serving.alert` → `model.promoted` with `rollback: true`,
only for a rule the pipeline names, never for drift, and only with evidence that the earlier
version does better on the metric that fired: evidence.py).
It also reads `pipeline.defined`, `training.requested` and `model.promoted` to keep its
state (state.py) current, and `search.completed` to size a search's sweep by the trials it
requested; that state is rebuilt from the log when the service opens.

Exactly-once effects: every decision has an id derived from the event that caused it
(uuid5 of the completion, the alert, pipeline + dataset event + sweep point, or rollout +
step + verdict) and is
skipped when that id is already in the log (read at start) or was published by this
process; each decision is confirmed by the broker (flush) before its cause's offset can be
committed. A debounced trigger whose cause was committed before it fired is found again at
the next start: the rebuild lists validated versions no request was made for.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from mlbus.consumers.workflow import rollout as rollouts
from mlbus.consumers.workflow.definitions import sweep_points
from mlbus.consumers.workflow.evidence import compare
from mlbus.consumers.workflow.policy import Champion, Evaluator, Verdict, judge, metric
from mlbus.consumers.workflow.state import (
    ACTOR,
    Pipeline,
    Position,
    State,
    Sweep,
    deadline_id,
    decision_id,
    read_state,
    request_id,
    rollback_id,
    time_of,
)
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Handler, Record
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef, Payload, PolicyRef
from mlbus.schemas.codec import wrap
from mlbus.schemas.datasets import DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted, ModelRejected
from mlbus.schemas.search import SearchCompleted, SearchRequested
from mlbus.schemas.serving import ServingAccuracy, ServingAlert, ServingMetrics
from mlbus.schemas.traffic import ModelTraffic, TrafficCriteria
from mlbus.schemas.training import (
    DEADLINE_EXCEEDED,
    SweepPoint,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
    run_id_for,
)
from mlbus.schemas.workflow import PipelineDefined
from mlbus.services import service
from mlbus.settings import LimitsSettings, WorkflowSettings

log = logging.getLogger(__name__)

# Its manifest (mlbus/services.py); the group without a topic prefix.
GROUP = service("workflow").group_id()
SOURCE = service("workflow").source
#: A closed debounce window fires once no version arrived for this long (not mid-backlog).
QUIET = 0.3


@dataclass
class Pending:
    """A debounced trigger: the newest matching version, fired when the window closes."""

    position: Position
    event: Event
    deadline: float  # epoch seconds: the first untriggered version's time + the window
    updated: float  # monotonic seconds: when the newest version arrived


class WorkflowService:
    """Open it (a context manager), then run `loop` (in this thread or another); the debounce
    timer runs in its own thread while the service is open."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        group: str = GROUP,
        evaluator: Evaluator | None = None,
        tick: float = 0.1,
        consumer_overrides: dict[str, Any] | None = None,
        limits: LimitsSettings | None = None,
        settings: WorkflowSettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.limits = limits or LimitsSettings()
        self.settings = settings or WorkflowSettings()
        self.group = group
        self.evaluator = evaluator
        self.tick = tick
        self.state = State()
        self.pending: dict[str, Pending] = {}
        #: model → the canary step in progress, with the windows counted in it
        self.steps: dict[str, rollouts.Step] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._timer: threading.Thread | None = None
        self._producer: EventProducer | None = None
        self.loop = ConsumerLoop(
            kafka,
            group=group,
            name="workflow",
            handlers=self.handlers(),
            consumer_overrides=consumer_overrides,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> WorkflowService:
        self._producer = EventProducer(self.kafka, source=SOURCE, **{"linger.ms": 0})
        self.state = read_state(self.kafka)
        with self._lock:
            for pipeline in list(self.state.pipelines.values()):
                self._schedule(pipeline)
            self._refill()
        self._closed.clear()
        self._timer = threading.Thread(target=self._run_timer, name="workflow-timer", daemon=True)
        self._timer.start()
        log.info(
            "workflow: %d pipeline(s), %d model(s), %d decision(s) in the log",
            len(self.state.pipelines),
            len(self.state.models),
            len(self.state.decided),
        )
        return self

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None:
            self._timer.join()
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> WorkflowService:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, **run_kwargs: Any) -> None:
        """Open, run the consumer loop until a signal or `loop.stop()`, close."""
        with self:
            self.loop.run(**run_kwargs)

    def handlers(self) -> dict[str, Handler[Any]]:
        return {
            "pipeline.defined": self._on_defined,
            "dataset.validated": self._on_validated,
            "training.requested": self._on_state,
            "search.requested": self._on_state,
            "search.completed": self._on_search_completed,
            "training.completed": self._on_outcome,
            "training.failed": self._on_outcome,
            "model.promoted": self._on_state,
            "model.traffic": self._on_traffic,
            "serving.alert": self._on_alert,
            "serving.metrics": self._on_window,
            "serving.accuracy": self._on_window,
            "deployment.updated": self._on_deployment,
        }

    # -- publishing -------------------------------------------------------------------------

    def _publish(self, data: Payload, *, cause: Event, event_id: str, **envelope: Any) -> Event:
        """Publish a decision, confirmed before returning, and apply it to the state."""
        assert self._producer is not None, "the service is not open"
        event = wrap(data, source=SOURCE, causation=cause, event_id=event_id, **envelope)
        self._producer.send(event)
        self._producer.flush()
        self.state.apply(event)
        return event

    # -- handlers (called by the consumer loop) ---------------------------------------------

    def _on_state(self, event: Event[TrainingRequested | ModelPromoted], record: Record) -> None:
        """Keeps the state current; idempotent by event id / log position."""
        with self._lock:
            self.state.apply(event, (record.partition, record.offset))

    def _on_defined(self, event: Event[PipelineDefined], record: Record) -> None:
        """A new revision takes effect for what arrives from now on (idempotent)."""
        with self._lock:
            self.state.apply(event, (record.partition, record.offset))
            pipeline = self.state.pipelines.get(event.data.name)
            if pipeline is not None:
                self._schedule(pipeline)

    def _on_validated(self, event: Event[DatasetValidated], record: Record) -> None:
        """Trigger: each matching pipeline requests training (now, or when its debounce
        window closes). Request ids derive from pipeline, dataset event and sweep point."""
        with self._lock:
            self.state.apply(event, (record.partition, record.offset))
            for pipeline in list(self.state.pipelines.values()):
                if self.state.matches(pipeline, event):
                    self._schedule(pipeline)

    def _on_outcome(self, event: Event[TrainingCompleted | TrainingFailed], record: Record) -> None:
        """Policy: decide on a completed run, or on a sweep once every run has finished or
        failed. Decision ids derive from the completion's id (skipped if in the log)."""
        with self._lock:
            self.state.apply(event, (record.partition, record.offset))
            self.decide(event)

    def _on_traffic(self, event: Event[ModelTraffic], record: Record) -> None:
        """A rollout started, stepped or ended (by hand, or by this service): the step whose
        windows are counted follows the model's newest traffic event (idempotent)."""
        with self._lock:
            if self.state.apply(event, (record.partition, record.offset)):
                self._track(event.data.model)

    def _on_window(self, event: Event[ServingMetrics | ServingAccuracy], record: Record) -> None:
        """A window of a version in a canary step: counted; a metrics window then decides the
        step (rollout.py). Decision ids derive from rollout, step and verdict."""
        with self._lock:
            step = self.steps.get(event.data.model)
            if step is None:
                return
            if event.type == "serving.accuracy":
                step.add_accuracy(cast("Event[ServingAccuracy]", event))
            elif step.add_metrics(cast("Event[ServingMetrics]", event)):
                self._decide_step(step, event)

    def _on_deployment(self, event: Event[DeploymentUpdated], record: Record) -> None:
        """A replica could not load the candidate of a rollout in progress (its report of
        the rollout's first event): the rollout is aborted, so that no replica goes on
        splitting traffic the others cannot. Id derived from the rollout."""
        update = event.data
        if update.status != "failed":
            return
        with self._lock:
            model = self.state.models.get(update.model)
            rollout = model.rollout if model else None
            if rollout is None:
                return
            traffic = rollout.data
            if traffic.candidate != update.version or event.causationid != traffic.rollout_id:
                return
            aid = rollouts.step_id(traffic.rollout_id, traffic.step, "load-failed")
            if aid in self.state.decided:
                return
            self._publish(
                rollouts.aborted(
                    traffic,
                    reason=f"{traffic.candidate} failed to load on replica {update.replica}: "
                    f"{update.error or 'failed'}",
                    actor=ACTOR,
                    analysis={"deployment": update.model_dump(mode="json")},
                    cause=event.id,
                ),
                cause=event,
                event_id=aid,
            )
            self.steps.pop(update.model, None)
            log.warning(
                "workflow: %s rollout of %s aborted: replica %s cannot load it",
                update.model,
                traffic.candidate,
                update.replica,
            )

    def _on_search_completed(self, event: Event[SearchCompleted], record: Record) -> None:
        """A search's end says how many trials it requested: its sweep is decided once they
        all have outcomes (now, or at the last one's outcome)."""
        with self._lock:
            self.state.apply(event, (record.partition, record.offset))
            sweep = self.state.sweeps.get(event.data.search_id)
            if sweep is not None and sweep.finished and sweep.requests:
                first = min(sweep.requests.values(), key=lambda e: e.data.sweep.index)
                self._decide_sweep(sweep, first.data)

    def _on_alert(self, event: Event[ServingAlert], record: Record) -> None:
        """Rollback on a firing alert for the champion; id derived from the alert's."""
        with self._lock:
            self.rollback(event)

    # -- trigger ----------------------------------------------------------------------------

    def _schedule(self, pipeline: Pipeline) -> None:
        """Trigger now, or leave a pending trigger for the timer. Windows are by event
        time: a window that a later version falls outside of is closed, and fires on its
        newest version at once (so catching up on a backlog, or a restart, gives the same
        runs as live processing); the last window fires when it has closed on the clock and
        no version arrived for `QUIET` seconds (the consumer is not mid-backlog)."""
        name = pipeline.defined.name
        window = pipeline.defined.debounce_seconds
        waiting = self.state.untriggered(pipeline)
        self.pending.pop(name, None)
        while waiting:
            first = time_of(waiting[0][1]).timestamp()
            size = 1
            while size < len(waiting) and time_of(waiting[size][1]).timestamp() <= first + window:
                size += 1
            position, newest = waiting[size - 1]
            if window == 0 or size < len(waiting):
                self._trigger(pipeline, position, newest)
                waiting = waiting[size:]
                continue
            self.pending[name] = Pending(position, newest, first + window, time.monotonic())
            return

    def _run_timer(self) -> None:
        while not self._closed.wait(self.tick):
            now, quiet = time.time(), time.monotonic() - QUIET
            with self._lock:
                try:
                    self.expire(datetime.now(UTC))
                except Exception:  # the broker is down: try again on the next tick
                    log.exception("workflow: declaring overdue sweep runs failed; retrying")
                due = [
                    n for n, p in self.pending.items() if p.deadline <= now and p.updated <= quiet
                ]
                for name in due:
                    pending = self.pending.pop(name)
                    pipeline = self.state.pipelines.get(name)
                    if pipeline is None or not self.state.matches(pipeline, pending.event):
                        continue
                    try:
                        self._trigger(pipeline, pending.position, pending.event)
                    except Exception:  # the broker is down: try again on the next tick
                        log.exception("workflow: trigger of %s failed; retrying", name)
                        self.pending[name] = pending

    def _trigger(
        self, pipeline: Pipeline, position: Position, cause: Event[DatasetValidated]
    ) -> None:
        spec = pipeline.defined
        data: DatasetValidated = cause.data
        runs = math.prod(len(values) for values in spec.sweep.values())
        if runs > self.limits.max_sweep_runs:
            # `apply` refuses such a file; a revision published by other means must not
            # flood the trainers (or this process's memory) either.
            log.error(
                "workflow: %s revision %d sweeps %d runs, over the limit of %d "
                "(MLBUS_LIMITS__MAX_SWEEP_RUNS): nothing requested for %s@%s",
                spec.name,
                spec.revision,
                runs,
                self.limits.max_sweep_runs,
                data.name,
                data.version[:12],
            )
            return
        if spec.search is not None:
            self._search(spec, cause)
            self.state.last_trigger[spec.name] = max(
                position, self.state.last_trigger.get(spec.name, position)
            )
            return
        points = sweep_points(spec)
        sweep_id = request_id(spec.name, cause.id, -1) if spec.sweep else None
        seconds = spec.deadline_seconds or self.settings.sweep_deadline_seconds
        deadline = datetime.now(UTC) + timedelta(seconds=seconds)
        for index, params in enumerate(points):
            rid = request_id(spec.name, cause.id, index)
            if rid in self.state.decided:
                continue
            request = TrainingRequested(
                model=spec.model,
                dataset=DatasetRef(name=data.name, version=data.version),
                family=spec.family,
                hyperparameters=params,
                seed=spec.seed,
                max_epochs=spec.max_epochs,
                early_stopping=spec.early_stopping,
                split=spec.split,
                requested_by=ACTOR,
                pipeline=spec.name,
                task=spec.task,
                loss=spec.loss,
                family_origin=spec.family_origin,
                sweep=SweepPoint(
                    sweep_id=sweep_id, index=index, size=len(points), deadline=deadline
                )
                if sweep_id
                else None,
            )
            # The dataset event's correlation id ties every point (and the runs) together.
            self._publish(
                request, cause=cause, event_id=rid, subject=f"{spec.name}@{spec.revision}"
            )
            log.info(
                "workflow: %s requested %s on %s@%s (%d/%d)",
                spec.name,
                spec.model,
                data.name,
                data.version[:12],
                index + 1,
                len(points),
            )
        self.state.last_trigger[spec.name] = max(
            position, self.state.last_trigger.get(spec.name, position)
        )

    def _search(self, spec: PipelineDefined, cause: Event[DatasetValidated]) -> None:
        """A pipeline with a `search:` block starts one search per version (its id derived
        from pipeline and dataset event); the tuning service runs it."""
        assert spec.search is not None
        sid = request_id(spec.name, cause.id, -2)
        if sid in self.state.decided:
            return
        plan, data = spec.search, cause.data
        self._publish(
            SearchRequested(
                search_id=sid,
                model=spec.model,
                dataset=DatasetRef(name=data.name, version=data.version),
                family=spec.family,
                family_origin=spec.family_origin,
                space=plan.space,
                hyperparameters=spec.hyperparameters,
                sampler=plan.sampler,
                pruner=plan.pruner,
                objective=plan.objective,
                trials=plan.trials,
                parallel=plan.parallel,
                timeout_seconds=plan.timeout_seconds,
                seed=spec.seed,
                max_epochs=spec.max_epochs,
                split=spec.split,
                pipeline=spec.name,
                requested_by=ACTOR,
            ),
            cause=cause,
            event_id=sid,
            subject=f"{spec.name}@{spec.revision}",
        )
        log.info(
            "workflow: %s started search %s on %s@%s", spec.name, sid, data.name, data.version[:12]
        )

    # -- deadlines --------------------------------------------------------------------------

    def expire(self, now: datetime) -> None:
        """Declare failed every run of a sweep past its deadline that has no outcome: one
        `training.failed` each (DeadlineExceeded, id derived from the request's), after which
        the sweep is decided on the runs it has. The expiry is an event in the log, so a
        rebuild sees the same outcomes and never consults the clock."""
        for sweep in list(self.state.sweeps.values()):
            if sweep.finished:
                continue
            due = sweep.due(self.settings.sweep_deadline_seconds)
            if due is None or due > now:
                continue
            for request in sweep.missing():
                self._expire_run(request, due)

    def _expire_run(self, request: Event[TrainingRequested], due: datetime) -> None:
        data: TrainingRequested = request.data
        fid = deadline_id(request.id)
        if fid in self.state.decided:
            return
        failed = self._publish(
            TrainingFailed(
                run_id=run_id_for(request.id),
                model=data.model,
                request_id=request.id,
                reason=f"deadline: no outcome by {due.isoformat()}, the deadline of sweep "
                f"{data.sweep.sweep_id if data.sweep else '?'}",
                retryable=False,
                error_type=DEADLINE_EXCEEDED,
            ),
            cause=request,
            event_id=fid,
        )
        log.warning(
            "workflow: %s run %s of sweep %s had no outcome by its deadline %s: failed",
            data.model,
            data.sweep.index if data.sweep else "?",
            data.sweep.sweep_id if data.sweep else "?",
            due.isoformat(),
        )
        self.decide(failed)

    # -- policy -----------------------------------------------------------------------------

    def decide(self, event: Event[TrainingCompleted | TrainingFailed]) -> None:
        data = event.data
        request = self.state.requests.get(data.request_id)
        if request is not None and request.sweep is not None:
            sweep = self.state.sweeps.get(request.sweep.sweep_id)
            if sweep is not None and sweep.finished:
                self._decide_sweep(sweep, request)
            return
        if isinstance(data, TrainingCompleted):
            self._decide_run(cast("Event[TrainingCompleted]", event), request)

    def _decide_sweep(self, sweep: Sweep, request: TrainingRequested) -> None:
        runs = [e for e in sweep.outcomes.values() if e.type == "training.completed"]
        pipeline = self.state.pipeline_for(request.model, request)
        if not runs or pipeline is None:
            return
        policy = pipeline.defined.policy
        sign = 1.0 if policy.mode == "max" else -1.0

        def score(e: Event) -> tuple[float, str]:
            value = metric(e.data, policy.metric)
            return (-sign * value if value is not None else float("inf"), e.data.run_id)

        best, *others = sorted(runs, key=score)
        best_value = metric(best.data, policy.metric)
        for other in others:
            did = decision_id(other.id)
            if did in self.state.decided:
                continue
            value = metric(other.data, policy.metric)
            self._publish(
                ModelRejected(
                    model=other.data.model,
                    version=other.data.version,
                    run_id=other.data.run_id,
                    reason=f"not the best run of its sweep on {policy.metric} "
                    f"(best: {best.data.version}, {best_value})",
                    actor=ACTOR,
                    policy=PolicyRef(name=policy.name, version=policy.version),
                    evidence={
                        "sweep_id": request.sweep.sweep_id if request.sweep else None,
                        "best": best.data.version,
                        policy.metric: value,
                        "best_value": best_value,
                        "pipeline": pipeline.defined.name,
                    },
                ),
                cause=other,
                event_id=did,
            )
        self._decide_run(best, self.state.requests.get(best.data.request_id), sweep=len(runs))

    def _decide_run(
        self,
        event: Event[TrainingCompleted],
        request: TrainingRequested | None,
        sweep: int | None = None,
    ) -> None:
        did = decision_id(event.id)
        if did in self.state.decided:
            return
        data: TrainingCompleted = event.data
        pipeline = self.state.pipeline_for(data.model, request)
        if pipeline is None:
            log.info("workflow: %s %s recorded; no pipeline governs it", data.model, data.version)
            return
        model = self.state.model(data.model)
        current = model.champion
        if current is not None and current.data.version == data.version:
            return  # already serving (promoted by hand before the policy saw it)
        champion = None
        if current is not None:
            run = model.runs.get(current.data.version)
            split = self.state.split_of(run.data) if run is not None else None
            champion = Champion(current.data.version, run.data if run else None, split)
        policy = pipeline.defined.policy
        verdict = judge(policy, data, self.state.split_of(data), champion, self.evaluator)
        evidence = verdict.evidence | {
            "pipeline": pipeline.defined.name,
            "pipeline_revision": pipeline.defined.revision,
        }
        if sweep is not None:
            evidence["sweep_runs"] = sweep
        ref = PolicyRef(name=policy.name, version=policy.version)
        rollout = model.rollout
        if verdict.promote and rollout is not None:  # one rollout at a time
            verdict = Verdict(
                False,
                f"{verdict.reason}; but a {rollout.data.strategy} rollout of "
                f"{rollout.data.candidate} is in progress (rollout {rollout.data.rollout_id})",
                evidence,
            )
        if verdict.promote and current is not None and pipeline.defined.rollout is not None:
            self._start_rollout(
                pipeline, event, current.data.version, verdict.reason, evidence, did
            )
            log.info(
                "workflow: %s %s: rollout started: %s", data.model, data.version, verdict.reason
            )
            return
        if verdict.promote:
            decision: Payload = ModelPromoted(
                model=data.model,
                version=data.version,
                run_id=data.run_id,
                previous_version=current.data.version if current else None,
                reason=verdict.reason,
                actor=ACTOR,
                policy=ref,
                evidence=evidence,
                cause=event.id,
                artifact=data.artifact,
                dataset=data.dataset,
            )
        else:
            decision = ModelRejected(
                model=data.model,
                version=data.version,
                run_id=data.run_id,
                reason=verdict.reason,
                actor=ACTOR,
                policy=ref,
                champion_version=current.data.version if current else None,
                evidence=evidence,
            )
        self._publish(decision, cause=event, event_id=did)
        log.info(
            "workflow: %s %s %s: %s",
            data.model,
            data.version,
            "promoted" if verdict.promote else "rejected",
            verdict.reason,
        )

    # -- rollouts ---------------------------------------------------------------------------

    def _track(self, model: str) -> rollouts.Step | None:
        """Follow the model's newest traffic event: a canary in progress has a step whose
        windows are counted (a new one when the event begins another step)."""
        found = self.state.models.get(model)
        current = found.traffic if found else None
        if current is None or not rollouts.analysed(current.data):
            self.steps.pop(model, None)
            return None
        step = self.steps.get(model)
        if step is None or step.traffic != current.data:
            step = self.steps[model] = rollouts.step_of(current)
        return step

    def _refill(self) -> None:
        """At start, count again the windows of each canary step in progress: they are in
        the log (read group-less), and the consumer group may have committed past them."""
        tracked = [m for m in self.state.models if self._track(m) is not None]
        if not tracked:
            return
        with LogView(
            self.kafka, ["serving.accuracy", "serving.metrics"], name="workflow rollouts"
        ) as view:
            items = sorted(view.catch_up(), key=lambda i: i.position)
        metrics = [i.event for i in items if i.topic == "serving.metrics"]
        accuracy = [i.event for i in items if i.topic == "serving.accuracy"]
        for window in rollouts.merge(metrics, accuracy):
            step = self.steps.get(window.data.model)
            if step is None:
                continue
            if window.type == "serving.accuracy":
                step.add_accuracy(window)
            elif step.add_metrics(window):
                self._decide_step(step, window)

    def _decide_step(self, step: rollouts.Step, window: Event) -> None:
        """Publish what the step's windows lead to, if anything: the next step, the rollout
        aborted, or completed followed by the `model.promoted` of its candidate."""
        decided = rollouts.decide(step, window.id, ACTOR)
        if decided is None:
            return
        traffic = step.traffic
        eid = rollouts.step_id(traffic.rollout_id, traffic.step, decided.status)
        if eid in self.state.decided:
            return
        event = self._publish(decided, cause=window, event_id=eid)
        log.warning(
            "workflow: %s %s rollout of %s at step %d: %s (%s)",
            traffic.model,
            traffic.strategy,
            traffic.candidate,
            traffic.step + 1,
            decided.status,
            decided.reason,
        )
        nxt = rollouts.following(step, decided)
        if nxt is not None:
            self.steps[traffic.model] = nxt
        else:
            self.steps.pop(traffic.model, None)
        if decided.status == "completed":
            pid = rollouts.promotion_id(traffic.rollout_id)
            if pid not in self.state.decided:
                self._publish(rollouts.promotion(decided, event.id), cause=event, event_id=pid)

    def _start_rollout(
        self,
        pipeline: Pipeline,
        run: Event[TrainingCompleted],
        champion: str,
        reason: str,
        evidence: dict[str, Any],
        event_id: str,
    ) -> None:
        """A candidate the policy promoted, rolled out as the pipeline's plan says."""
        spec = pipeline.defined
        plan = spec.rollout
        assert plan is not None
        data: TrainingCompleted = run.data
        criteria = TrafficCriteria(
            min_samples=plan.min_samples or self.settings.rollout_min_samples,
            confidence=self.settings.rollout_confidence,
            max_error_ratio=self.settings.rollout_max_error_ratio,
            max_latency_ratio=self.settings.rollout_max_latency_ratio,
            min_labelled=self.settings.rollout_min_labelled,
        )
        if plan.strategy == "canary":
            weight, steps, shadow = plan.steps[0], list(plan.steps), False
        elif plan.strategy == "ab":
            weight, steps, shadow = plan.weight or 50, [], False
        else:
            weight, steps, shadow = 0, [], True
        weights = {champion: 100 - weight} | ({data.version: weight} if weight else {})
        self._publish(
            ModelTraffic(
                model=data.model,
                rollout_id=event_id,
                strategy=plan.strategy,
                status="started",
                stable=champion,
                candidate=data.version,
                weights=weights,
                shadow=shadow,
                steps=steps,
                criteria=criteria,
                analysis={"policy": evidence},
                reason=reason,
                actor=ACTOR,
                policy=PolicyRef(name=spec.policy.name, version=spec.policy.version),
                run_id=data.run_id,
                artifact=data.artifact,
                dataset=data.dataset,
                cause=run.id,
            ),
            cause=run,
            event_id=event_id,
        )
        self._track(data.model)

    # -- rollback ---------------------------------------------------------------------------

    def rollback(self, event: Event[ServingAlert]) -> None:
        alert: ServingAlert = event.data
        rid = rollback_id(event.id)
        if alert.status != "firing" or rid in self.state.decided:
            return
        model = self.state.models.get(alert.model)
        current = model.champion if model else None
        if model is None or current is None or current.data.version != alert.version:
            log.info(
                "workflow: alert %s on %s %s: not the champion, nothing to roll back",
                alert.alert,
                alert.model,
                alert.version,
            )
            return
        pipeline = self.state.pipeline_for(alert.model, None)
        if pipeline is None:
            log.info("workflow: alert on %s: no pipeline, no automatic rollback", alert.model)
            return
        policy = pipeline.defined.rollback
        if not policy.enabled:
            return
        if not alert.rollback or alert.alert == "psi":
            log.info(
                "workflow: alert %s on %s %s: drift only alerts, never rolls back",
                alert.alert,
                alert.model,
                alert.version,
            )
            return
        if alert.alert not in policy.alerts:
            log.info(
                "workflow: alert %s on %s %s: not named in the rollback policy of %s (%s)",
                alert.alert,
                alert.model,
                alert.version,
                pipeline.defined.name,
                ", ".join(policy.alerts) or "none",
            )
            return
        if _aware(alert.window_end) < _aware(current.time):
            # An alert on windows before this promotion (a replayed stream, an earlier stint
            # of the same version) says nothing of the version serving now.
            log.info(
                "workflow: alert %s on %s %s is on windows before its promotion; ignored",
                alert.alert,
                alert.model,
                alert.version,
            )
            return
        last = model.last_automatic_rollback()
        if (
            last is not None
            and (time_of(event) - last).total_seconds() < policy.min_interval_seconds
        ):
            log.warning(
                "workflow: alert %s on %s %s: a rollback was made at %s; not again "
                "within %gs (flapping guard)",
                alert.alert,
                alert.model,
                alert.version,
                last.isoformat(),
                policy.min_interval_seconds,
            )
            return
        target = model.previous_good()
        if target is None:
            log.warning(
                "workflow: alert on %s %s: no earlier good version to roll back to",
                alert.model,
                alert.version,
            )
            return
        comparison = compare(alert, target.data.version)
        if not comparison.better:
            log.warning(
                "workflow: alert %s on %s %s: no rollback to %s: %s",
                alert.alert,
                alert.model,
                alert.version,
                target.data.version,
                comparison.reason,
            )
            return
        promotion = pipeline.defined.policy
        rollout = model.rollout
        if rollout is not None:  # the champion is rolled back: its rollout ends first
            aid = rollouts.step_id(rollout.data.rollout_id, rollout.data.step, "rollback")
            if aid not in self.state.decided:
                self._publish(
                    rollouts.aborted(
                        rollout.data,
                        reason=f"the stable version {current.data.version} is rolled back "
                        f"(alert {alert.alert})",
                        actor=ACTOR,
                        cause=event.id,
                    ),
                    cause=event,
                    event_id=aid,
                )
                self.steps.pop(alert.model, None)
        self._publish(
            ModelPromoted(
                model=alert.model,
                version=target.data.version,
                run_id=target.data.run_id,
                previous_version=current.data.version,
                reason="rollback",
                actor=ACTOR,
                policy=PolicyRef(name=promotion.name, version=promotion.version),
                evidence={
                    "alert": alert.model_dump(mode="json"),
                    "from": current.data.version,
                    "to": target.data.version,
                    "to_promoted_by": target.event_id,
                    "pipeline": pipeline.defined.name,
                    "comparison": comparison.evidence(),
                },
                rollback=True,
                cause=event.id,
                artifact=target.data.artifact,
                dataset=target.data.dataset,
            ),
            cause=event,
            event_id=rid,
        )
        log.warning(
            "workflow: %s rolled back from %s to %s (alert %s)",
            alert.model,
            current.data.version,
            target.data.version,
            alert.alert,
        )


def _aware(at: datetime) -> datetime:
    """A time without a zone is UTC (the contract's times are; a hand-made event may omit it)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)

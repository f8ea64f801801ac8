"""Pipeline definitions: the YAML file a user applies, checked line by line, and published
as `pipeline.defined` with the next revision (read from the log). Nothing is published
when the file is wrong, or when it says what the newest revision already says.

A file is refused before it is expanded when it is larger than `limits.max_pipeline_bytes`,
uses a YAML alias (a pipeline never needs one, and nested aliases expand exponentially), or
sweeps a grid of more than `limits.max_sweep_runs` points.

Format and policy: infra/pipelines/README.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from mlbus.errors import Invalid
from mlbus.families import TASK_METRICS, InvalidModelSpec, hyperparameters, resolve, task_of
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.envelope import Event
from mlbus.schemas.search import SearchPlan, SearchRequested
from mlbus.schemas.workflow import PipelineDefined
from mlbus.search import InvalidSearch, check_search, parse_space
from mlbus.settings import LimitsSettings

_LATENCY = frozenset({"inference.latency_p50_ms", "inference.latency_p95_ms"})


def task_metrics(task: str) -> frozenset[str]:
    """Metrics the trainer reports in `training.completed` for a task, as `split.metric`."""
    return _LATENCY | {
        f"{split}.{m}" for split in ("train", "validation", "test") for m in TASK_METRICS[task]
    }


#: Every metric the trainer reports, whatever the task.
KNOWN_METRICS = frozenset().union(*(task_metrics(t) for t in TASK_METRICS))
#: Fields of the envelope of a revision, not of its content: equal content = no new revision.
_NOT_CONTENT = {"revision", "actor", "source"}


class InvalidPipeline(Invalid):
    """A pipeline file that cannot be applied; the message names the file and line."""


Path_ = tuple[str | int, ...]


class _AliasRefused(yaml.YAMLError):
    def __init__(self, anchor: str, mark: yaml.Mark) -> None:
        super().__init__(anchor)
        self.anchor, self.problem_mark = anchor, mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: an alias (`*name`) is refused where it is met,
    before any node refers to another, so a few hundred bytes of nested aliases cannot
    expand into gigabytes when the document is walked or validated."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(str(event.anchor), event.start_mark)
        return super().compose_node(parent, index)


def _load(text: str, source: str, limits: LimitsSettings) -> tuple[yaml.Node | None, Any]:
    """The document's node tree and its plain data, within the limits."""
    size = len(text.encode())
    if size > limits.max_pipeline_bytes:
        raise InvalidPipeline(
            f"{source}: {size} bytes, over the limit of {limits.max_pipeline_bytes} bytes for "
            "a pipeline file (MLBUS_LIMITS__MAX_PIPELINE_BYTES)"
        )
    try:
        loader = _Loader(text)
    except yaml.YAMLError as e:  # the reader refuses a character before anything is parsed
        raise InvalidPipeline(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except _AliasRefused as e:
        raise InvalidPipeline(
            f"{source} line {e.problem_mark.line + 1}: YAML aliases (*{e.anchor}) are not "
            "allowed in a pipeline file: write the value out"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        detail = " ".join(str(e).split())
        raise InvalidPipeline(f"{source} line {line}: not valid YAML ({detail})") from None
    finally:
        loader.dispose()


class _Lines:
    """Line numbers (1-based) of every key and item of a YAML document, by path."""

    def __init__(self, node: yaml.Node | None) -> None:
        self.lines: dict[Path_, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: Path_) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
                self.lines[sub] = key.start_mark.line + 1  # the key's line, not the value's
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, i))

    def of(self, path: Iterable[str | int]) -> int:
        """The line of `path`, or of its nearest ancestor present in the file."""
        path = tuple(path)
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


#: The alert rules of the streams that a pipeline may name in `rollback.alerts`.
ROLLBACK_RULES = ("error_rate", "latency_p99", "accuracy", "rmse")


def parse(
    text: str,
    *,
    source: str = "pipeline",
    actor: str = "unknown",
    limits: LimitsSettings | None = None,
) -> PipelineDefined:
    """Check a pipeline file; `InvalidPipeline` naming `source` and the line if it is wrong
    (or over `limits`, the defaults unless given). The result has revision 1: `apply` sets
    the real one."""
    limits = limits or LimitsSettings()

    def fail(path: Iterable[str | int], message: str) -> InvalidPipeline:
        path = tuple(path)
        return InvalidPipeline(f"{source} line {lines.of(path)}: {_dotted(path)}: {message}")

    node, raw = _load(text, source, limits)
    lines = _Lines(node)
    if not isinstance(raw, dict):
        raise InvalidPipeline(f"{source} line 1: a pipeline is a mapping (name: ..., dataset: ...)")
    for required in ("name", "dataset", "model", "family", "policy"):
        if raw.get(required) in (None, ""):
            raise InvalidPipeline(
                f"{source} line {lines.of(())}: {required}: missing (required; the pipeline "
                "starts on this line)"
            )
    for forbidden in ("revision", "actor", "source", "family_origin"):
        if forbidden in raw:
            raise fail((forbidden,), "set by `mlbus pipelines apply`, not by the file")
    family = raw["family"]
    try:
        origin = resolve(str(family)).origin
    except InvalidModelSpec as e:
        raise fail(("family",), str(e)) from None
    try:
        task = task_of(str(family), raw.get("task"))
    except InvalidModelSpec as e:
        raise fail(("task",), str(e)) from None
    known = task_metrics(task)
    params = raw.get("hyperparameters") or {}
    sweep = raw.get("sweep") or {}
    if not isinstance(params, dict):
        raise fail(("hyperparameters",), "a mapping of name: value")
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise fail(("sweep",), "a mapping of name: [value, value, ...]")
    runs = math.prod(len(values) for values in sweep.values())
    if runs > limits.max_sweep_runs:
        grid = " x ".join(f"{len(values)} {name}" for name, values in sweep.items())
        raise fail(
            ("sweep",),
            f"{grid} = {runs} runs, over the limit of {limits.max_sweep_runs} "
            "(MLBUS_LIMITS__MAX_SWEEP_RUNS)",
        )
    try:
        hyperparameters(family, params)
    except InvalidModelSpec as e:
        raise fail(("hyperparameters", _offending(e, params)), str(e)) from None
    for name, values in sweep.items():
        for i, value in enumerate(values):
            try:
                hyperparameters(family, params | {name: value})
            except InvalidModelSpec as e:
                raise fail(("sweep", name, i), str(e)) from None
    if raw.get("search") is not None:
        _check_search(raw, family, params, sweep, fail, task, known)
    policy = raw.get("policy")
    if not isinstance(policy, dict):
        raise fail(("policy",), "a mapping (name, metric, mode, margin, thresholds)")
    if policy.get("metric", "test.accuracy") not in known:
        raise fail(("policy", "metric"), _unknown_metric(policy.get("metric"), task, known))
    thresholds = policy.get("thresholds") or []
    if not isinstance(thresholds, list):
        raise fail(("policy", "thresholds"), "a list of {metric, op, value}")
    for i, threshold in enumerate(thresholds):
        metric = threshold.get("metric") if isinstance(threshold, dict) else None
        if metric not in known:
            raise fail(("policy", "thresholds", i, "metric"), _unknown_metric(metric, task, known))
    rollback = raw.get("rollback")
    alerts = rollback.get("alerts") if isinstance(rollback, dict) else None
    for i, rule in enumerate(alerts if isinstance(alerts, list) else []):
        if rule not in ROLLBACK_RULES:
            why = "drift only alerts, it never rolls back" if rule == "psi" else "unknown rule"
            raise fail(
                ("rollback", "alerts", i),
                f"{rule!r}: {why}; rules that may roll back: {', '.join(ROLLBACK_RULES)}",
            )
    plan = raw.get("rollout")
    if isinstance(plan, dict) and plan.get("strategy", "canary") == "canary":
        steps = plan.get("steps", [10, 50, 100])
        numbers = isinstance(steps, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in steps
        )
        if not numbers or len(steps) < 2 or steps != sorted(set(steps)) or steps[-1] != 100:
            raise fail(
                ("rollout", "steps"),
                f"{steps!r}: a canary's weights, ascending, at least one below 100, ending at "
                "100 (e.g. [10, 50, 100])",
            )
    fields = raw | {"revision": 1, "actor": actor, "source": text, "family_origin": origin}
    try:
        return PipelineDefined.model_validate(fields)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise fail(first["loc"], first["msg"]) from None


def _check_search(
    raw: Mapping[str, Any],
    family: str,
    params: Mapping[str, Any],
    sweep: Any,
    fail: Any,
    task: str,
    known: frozenset[str],
) -> None:
    """A `search:` block, checked as `mlbus tune` checks a search (space, budget, names)."""
    block = raw["search"]
    if sweep:
        raise fail(("search",), "a pipeline has a sweep or a search, not both")
    if not isinstance(block, dict):
        raise fail(("search",), "a mapping (space, trials, parallel, sampler, pruner, ...)")
    if block.get("trials") in (None, 0):
        raise fail(("search", "trials"), "a budget of at least one trial")
    try:
        space = parse_space(block.get("space"), where="space")
        plan = SearchPlan.model_validate(block | {"space": space})
        check_search(
            SearchRequested(
                search_id="check",
                model=str(raw["model"]),
                dataset=DatasetRef(name="check", version="check"),
                family=family,
                space=plan.space,
                hyperparameters=dict(params),
                sampler=plan.sampler,
                trials=plan.trials,
            )
        )
    except InvalidSearch as e:
        raise fail(("search",), str(e)) from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise fail(("search", *first["loc"]), first["msg"]) from None
    if plan.objective.metric not in known:
        raise fail(
            ("search", "objective", "metric"), _unknown_metric(plan.objective.metric, task, known)
        )


def _offending(error: InvalidModelSpec, params: Mapping[str, Any]) -> str:
    return next((k for k in params if f"{k!r}" in str(error) or f"{k}=" in str(error)), "")


def _unknown_metric(metric: object, task: str, known: frozenset[str]) -> str:
    return (
        f"the trainer does not report a metric {metric!r} for a {task} model; known: "
        f"{', '.join(sorted(known))}"
    )


def sweep_points(pipeline: PipelineDefined) -> list[dict[str, Any]]:
    """The grid of a sweep, in a stable order (one point when there is no sweep)."""
    axes = pipeline.sweep
    return [
        pipeline.hyperparameters | dict(zip(axes, combo, strict=True))
        for combo in itertools.product(*axes.values())
    ]


def content(pipeline: PipelineDefined) -> dict[str, Any]:
    """What a revision says, without who applied it or the file's comments and layout."""
    return pipeline.model_dump(mode="json", exclude=_NOT_CONTENT)


@dataclass(frozen=True)
class Applied:
    pipeline: PipelineDefined
    published: bool
    event_id: str | None
    message: str


def newest_revisions(kafka: KafkaConfig) -> dict[str, Event]:
    """The newest `pipeline.defined` of each pipeline name, from the log."""
    newest: dict[str, Event] = {}
    with LogView(kafka, ["pipeline.defined"], name="pipeline definitions") as view:
        events = [item.event for item in view.catch_up()]
    for event in events:
        data: PipelineDefined = event.data
        current = newest.get(data.name)
        if current is None or data.revision >= current.data.revision:
            newest[data.name] = event
    return newest


def apply(
    kafka: KafkaConfig,
    text: str,
    *,
    source: str,
    actor: str,
    limits: LimitsSettings | None = None,
) -> Applied:
    """Publish the file as the next revision of its pipeline, unless it is wrong (raises
    `InvalidPipeline`) or says what the newest revision says (nothing published)."""
    parsed = parse(text, source=source, actor=actor, limits=limits)
    current = newest_revisions(kafka).get(parsed.name)
    if current is not None and content(current.data) == content(parsed):
        return Applied(
            current.data,
            False,
            current.id,
            f"pipeline {parsed.name} unchanged: revision {current.data.revision} is in force",
        )
    revision = 1 if current is None else current.data.revision + 1
    pipeline = parsed.model_copy(update={"revision": revision})
    with EventProducer(kafka, source="mlbus/workflow") as producer:
        ref = producer.publish(pipeline, subject=f"{pipeline.name}@{revision}")
        producer.flush()
    verb = "defined" if revision == 1 else "updated"
    return Applied(pipeline, True, ref.id, f"pipeline {pipeline.name} {verb}: revision {revision}")

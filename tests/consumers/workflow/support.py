"""Helpers of the workflow manager's tests: hand-made events (a run, a validated dataset
version, an alert), pipelines as YAML text, and the workflow service run in a thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlbus.consumers.workflow.definitions import apply
from mlbus.consumers.workflow.service import WorkflowService
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef, Payload
from mlbus.schemas.codec import EventRef
from mlbus.schemas.datasets import DatasetValidated
from mlbus.schemas.serving import ServingAlert
from mlbus.schemas.training import Artifact, CodeVersion, TrainingCompleted, TrainingFailed
from tests.mlbus.kafka.support import LoopThread, read_events, run_to_end, wait_until

REPO = Path(__file__).resolve().parents[3]
DIGITS_YAML = REPO / "infra" / "pipelines" / "digits.yaml"
SHA = "sha256:" + "cd" * 32

PIPELINE = """\
name: {name}
dataset: {dataset}
model: {model}
family: mlp
hyperparameters: {{hidden: 32}}
max_epochs: 3
debounce_seconds: {debounce}
policy:
  name: {name}-policy
  version: 2
  metric: test.accuracy
  margin: 0.01
  thresholds:
    - {{metric: test.accuracy, op: ">=", value: 0.9}}
    - {{metric: inference.latency_p95_ms, op: "<=", value: 20}}
rollback:
  alerts: [error_rate, accuracy]
  min_interval_seconds: {interval}
"""


def pipeline_text(
    name: str = "p1",
    *,
    dataset: str = "iris",
    model: str = "m1",
    debounce: float = 0,
    interval: float = 600,
    extra: str = "",
) -> str:
    text = PIPELINE.format(
        name=name, dataset=dataset, model=model, debounce=debounce, interval=interval
    )
    return text + extra


def define(kafka: KafkaConfig, text: str) -> None:
    applied = apply(kafka, text, source="test.yaml", actor="test")
    assert applied.published, applied.message


def send(kafka: KafkaConfig, *payloads: Payload, **envelope: Any) -> list[EventRef]:
    with EventProducer(kafka, source="test") as producer:
        refs = [producer.publish(p, **envelope) for p in payloads]
        producer.flush()
    return refs


def validated(name: str = "iris", version: str = "v1", **tags: str) -> DatasetValidated:
    return DatasetValidated(
        name=name,
        version=version,
        uri=f"file:///nowhere/{name}/{version}.parquet",
        content_hash=SHA,
        num_rows=150,
        validator="test",
        tags=tags,
        label_column="label",
    )


def completed(
    model: str = "m1",
    version: str = "r1",
    accuracy: float = 0.95,
    *,
    latency: float = 2.0,
    dataset: str = "iris",
    dataset_version: str = "v1",
    request_id: str | None = None,
    seed: int = 0,
) -> TrainingCompleted:
    return TrainingCompleted(
        run_id=f"run-{version}",
        model=model,
        version=version,
        request_id=request_id or f"req-{version}",
        family="mlp",
        dataset=DatasetRef(name=dataset, version=dataset_version),
        artifact=Artifact(
            uri=f"file:///models/{model}/{version}/model.safetensors",
            sha256=SHA,
            model_card_uri=f"file:///models/{model}/{version}/model_card.json",
        ),
        metrics={
            "test": {"accuracy": accuracy, "loss": 1 - accuracy},
            "inference": {"latency_p50_ms": latency / 2, "latency_p95_ms": latency},
        },
        seed=seed,
        epochs=3,
        code=CodeVersion(package_version="test"),
        duration_seconds=1.0,
    )


def failed(model: str, request_id: str) -> TrainingFailed:
    return TrainingFailed(
        run_id=f"run-{request_id}",
        model=model,
        request_id=request_id,
        reason="boom",
        retryable=False,
    )


def alert(
    model: str,
    version: str,
    status: str = "firing",
    name: str = "error_rate",
    *,
    others: dict[str, tuple[int, int]] | None = None,
) -> Any:
    """A firing alert as the streams publish it: 20 % server errors over 3 windows of 200
    requests, with the history of `others` (version → (errors, requests); default: every
    other version of a..e at 2 errors in 1000)."""
    if others is None:
        others = {v: (2, 1000) for v in "abcde" if v != version}
    return ServingAlert(
        model=model,
        version=version,
        alert=name,
        status=status,
        metric="error_rate",
        value=0.2,
        threshold=0.05,
        windows=3,
        window_end=datetime.now(UTC),
        samples=600,
        evidence={
            "confidence": 0.99,
            "min_samples": 100,
            "pooled": {"n": 600, "errors": 120},
            "others": {v: {"windows": 10, "n": n, "k": k} for v, (k, n) in others.items()},
        },
    )


@contextmanager
def running(kafka: KafkaConfig, group: str, **options: Any) -> Iterator[WorkflowService]:
    """The workflow service, open and consuming in a thread, until the block ends."""
    with WorkflowService(kafka, group=group, **options) as service, LoopThread(service.loop):
        yield service


def catch_up(kafka: KafkaConfig, group: str, **options: Any) -> WorkflowService:
    """Open the service, consume every topic to its end, stop (deterministic: no waiting)."""
    with WorkflowService(kafka, group=group, **options) as service:
        run_to_end(service.loop, timeout=60)
    return service


def decisions(kafka: KafkaConfig) -> dict[str, list[Any]]:
    return {t: read_events(kafka, t) for t in ("model.promoted", "model.rejected")}


def at_least(kafka: KafkaConfig, event_type: str, n: int, timeout: float = 30.0) -> list[Any]:
    """Wait until the topic holds at least `n` events; all of them."""

    def enough() -> list[Any]:
        found = read_events(kafka, event_type)
        return found if len(found) >= n else []

    return wait_until(enough, f"{n} {event_type} event(s)", timeout=timeout)

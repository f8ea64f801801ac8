"""Experiments as queries of the lineage store, on both backends: runs folded from their
training events (in any order, and after a rebuild) into a status, hyperparameters, curves,
final metrics of any task (classification or regression), confusion matrix, artifact and
decisions; listed, filtered, sorted by a metric, shown and compared; and the same over HTTP."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.lineage.api import runs_router
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.runs import InvalidRunQuery, RunQueries
from mlbus.consumers.lineage.store import LineageStore, NotInLineage
from mlbus.http import install_error_handlers
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.models import ModelPromoted, ModelRejected
from mlbus.schemas.training import (
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    run_id_for,
)
from tests.consumers.lineage.conftest import rebuilt_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHA = "sha256:" + "ab" * 32
DATASET = {"name": "digits", "version": "v1"}


class Log:
    """Events with their ids, as a log would hold them (one partition per topic)."""

    def __init__(self) -> None:
        self.records: list[LogRecord] = []
        self.offsets: dict[str, int] = {}

    def add(self, payload: Payload, **envelope: Any) -> str:
        minute = len(self.records)
        ref, value = encode_new(
            payload, source="test", time=T0 + timedelta(minutes=minute), **envelope
        )
        offset = self.offsets.get(ref.type, 0)
        self.offsets[ref.type] = offset + 1
        self.records.append(
            LogRecord(
                ref.type,
                0,
                offset,
                None,
                (ref.key or "").encode(),
                tuple(STRUCTURED_HEADERS),
                value,
            )
        )
        return ref.id


def _request(log: Log, model: str, hyper: dict[str, Any], **fields: Any) -> tuple[str, str]:
    request = log.add(
        TrainingRequested.model_validate(
            {
                "model": model,
                "dataset": DATASET,
                "family": "mlp",
                "hyperparameters": hyper,
                "max_epochs": 3,
                "requested_by": "user:ann",
                **fields,
            }
        )
    )
    return request, run_id_for(request)


def _started(log: Log, model: str, request: str, run: str, attempt: int = 1) -> None:
    log.add(
        TrainingStarted(
            run_id=run,
            model=model,
            request_id=request,
            dataset=DATASET,  # type: ignore[arg-type]  # validated into a DatasetRef
            worker="w1",
            attempt=attempt,
        )
    )


def _epochs(log: Log, model: str, run: str, losses: list[float], metric: str) -> None:
    for epoch, loss in enumerate(losses, start=1):
        log.add(
            TrainingProgress(
                run_id=run,
                model=model,
                epoch=epoch,
                max_epochs=3,
                metrics={"train.loss": loss, "validation.loss": loss + 0.1, metric: 1 - loss},
                samples_per_second=1000.0,
            )
        )


def _completed(
    log: Log, model: str, request: str, run: str, version: str, metrics: dict[str, Any], **more: Any
) -> None:
    log.add(
        TrainingCompleted.model_validate(
            {
                "run_id": run,
                "model": model,
                "version": version,
                "request_id": request,
                "family": "mlp",
                "dataset": DATASET,
                "artifact": {"uri": f"file:///{version}", "sha256": SHA, "size_bytes": 123},
                "metrics": metrics,
                "hyperparameters": more.pop("hyperparameters", {}),
                "epochs": 3,
                "code": {"package_version": "0.1.0"},
                "duration_seconds": 4.5,
                "device": "cpu",
                **more,
            }
        )
    )


def history() -> tuple[Log, dict[str, str]]:
    """Four runs of `digits` (two completed, one failed for good after a retry, one only
    requested) and a regression run of `houses`, with decisions on the completed ones."""
    log, runs = Log(), {}
    for name, lr in (("a", 0.1), ("b", 0.01)):
        request, run = _request(log, "digits", {"lr": lr, "hidden": 32})
        runs[name] = run
        _started(log, "digits", request, run)
        base = 0.5 if name == "a" else 0.3
        _epochs(log, "digits", run, [base, base - 0.1, base - 0.2], "validation.accuracy")
        _completed(
            log,
            "digits",
            request,
            run,
            f"ver-{name}",
            {"test": {"accuracy": 1 - base, "loss": base}, "train": {"loss": base - 0.2}},
            hyperparameters={"lr": lr, "hidden": 32},
            confusion_matrix=[[5, 1], [0, 4]],
            labels=["0", "1"],
        )
    request, run = _request(log, "digits", {"lr": 5.0, "hidden": 32})
    runs["failed"] = run
    _started(log, "digits", request, run)
    log.add(
        TrainingFailed(run_id=run, model="digits", request_id=request, reason="io", retryable=True)
    )
    _started(log, "digits", request, run, attempt=2)
    log.add(
        TrainingFailed(
            run_id=run, model="digits", request_id=request, reason="loss is NaN", retryable=False
        )
    )
    _, runs["queued"] = _request(log, "digits", {"lr": 0.5, "hidden": 64})
    request, run = _request(log, "houses", {"lr": 0.01}, sweep=None)
    runs["regression"] = run
    _started(log, "houses", request, run)
    _epochs(log, "houses", run, [0.9, 0.5, 0.4], "validation.rmse")
    _completed(
        log,
        "houses",
        request,
        run,
        "ver-r",
        {"test": {"rmse": 0.41, "mae": 0.3, "r2": 0.7}},
        hyperparameters={"lr": 0.01},
    )
    log.add(
        ModelPromoted(
            model="digits",
            version="ver-b",
            run_id=runs["b"],
            actor="mlbus/workflow",
            reason="beats the champion",
            policy={"name": "accuracy", "version": 2},
        )
    )
    log.add(
        ModelRejected(
            model="digits",
            version="ver-a",
            run_id=runs["a"],
            actor="mlbus/workflow",
            reason="does not beat ver-b",
            champion_version="ver-b",
        )
    )
    return log, runs


@pytest.fixture
def projected(store: LineageStore) -> tuple[RunQueries, dict[str, str]]:
    log, runs = history()
    Projector(store).project(log.records)
    return RunQueries(store), runs


def _answers(q: RunQueries, runs: dict[str, str]) -> Any:
    return (
        q.list(),
        q.show(runs["a"]),
        q.show(runs["failed"]),
        q.compare([runs["a"], runs["b"], runs["queued"]]),
    )


def test_each_run_is_folded_from_its_events(projected: tuple[RunQueries, dict[str, str]]) -> None:
    q, runs = projected
    status = {r.run_id: r.status for r in q.list()}
    assert status == {
        runs["a"]: "completed",
        runs["b"]: "completed",
        runs["failed"]: "failed",
        runs["queued"]: "requested",
        runs["regression"]: "completed",
    }
    a = q.show(runs["a"])
    assert (a.model, a.version, a.dataset, a.family) == ("digits", "ver-a", "digits@v1", "mlp")
    assert a.hyperparameters == {"lr": 0.1, "hidden": 32}
    assert a.requested_by == "user:ann"
    assert a.request["split"] == {"validation": 0.15, "test": 0.15}
    assert [e.epoch for e in a.curves] == [1, 2, 3]
    assert a.curves[-1].metrics["train.loss"] == pytest.approx(0.3)
    assert a.final_metrics["test"]["accuracy"] == pytest.approx(0.5)
    assert a.metrics["test.accuracy"] == pytest.approx(0.5)
    assert a.confusion_matrix == [[5, 1], [0, 4]] and a.labels == ["0", "1"]
    assert a.artifact == {"uri": "file:///ver-a", "sha256": SHA, "size_bytes": 123,
                          "format": "safetensors"}  # fmt: skip
    assert a.details["device"] == "cpu"
    assert [(d.kind, d.actor) for d in a.decisions] == [("rejected", "mlbus/workflow")]
    assert q.show(runs["b"]).decisions[0].policy == "accuracy v2"
    failed = q.show(runs["failed"])
    assert failed.failure == "loss is NaN" and failed.attempts == 2
    assert [f["retryable"] for f in failed.failures] == [True, False]
    regression = q.show(runs["regression"])
    assert regression.metrics == {"test.rmse": 0.41, "test.mae": 0.3, "test.r2": 0.7}


def test_listing_filters_and_sorts_by_a_metric(
    projected: tuple[RunQueries, dict[str, str]],
) -> None:
    q, runs = projected
    assert {r.run_id for r in q.list(model="houses")} == {runs["regression"]}
    assert {r.run_id for r in q.list("digits", "completed")} == {runs["a"], runs["b"]}
    best = [r.run_id for r in q.list("digits", sort="test.accuracy")]
    assert best[:2] == [runs["b"], runs["a"]]  # best first; runs without the metric after
    assert set(best[2:]) == {runs["failed"], runs["queued"]}
    assert [r.run_id for r in q.list("digits", sort="test.loss")][:2] == [runs["b"], runs["a"]]
    assert len(q.list(limit=2)) == 2
    with pytest.raises(InvalidRunQuery, match="status 'done'"):
        q.list(status="done")


def test_runs_are_named_by_id_prefix_or_model_version(
    projected: tuple[RunQueries, dict[str, str]],
) -> None:
    q, runs = projected
    assert q.resolve(runs["a"][:13]) == runs["a"]
    assert q.resolve("digits@ver-b") == runs["b"]
    assert q.resolve(runs["queued"]) == runs["queued"]
    with pytest.raises(NotInLineage):
        q.show("nosuch")
    with pytest.raises(NotInLineage):
        q.resolve("digits@nosuch")
    with pytest.raises(InvalidRunQuery, match="more than one version"):
        q.resolve("digits@ver-")  # ver-a and ver-b


def test_compare_marks_differences_and_the_best_run(
    projected: tuple[RunQueries, dict[str, str]],
) -> None:
    q, runs = projected
    c = q.compare([runs["a"], runs["b"]])
    hyper = {row.name: row for row in c.hyperparameters}
    assert hyper["lr"].values == [0.1, 0.01] and hyper["lr"].differs
    assert hyper["hidden"].values == [32, 32] and not hyper["hidden"].differs
    metrics = {row.name: row for row in c.metrics}
    assert metrics["test.accuracy"].best == 1  # higher is better
    assert metrics["test.loss"].best == 1  # lower is better
    assert c.curves == ["train.loss", "validation.loss", "validation.accuracy"]
    assert all(len(r.curves) == 3 for r in c.runs)
    regression = q.compare([runs["regression"], runs["a"]])
    assert {row.name: row.values for row in regression.metrics}["test.rmse"] == [0.41, None]


def test_answers_do_not_depend_on_event_order_and_survive_a_rebuild(
    store: LineageStore,
) -> None:
    log, runs = history()
    shuffled = list(log.records)
    random.Random(7).shuffle(shuffled)
    Projector(store).project(shuffled, batch_size=5)
    reference = _answers(RunQueries(store), runs)
    rebuilt = rebuilt_store(store, log.records)
    try:
        assert _answers(RunQueries(rebuilt), runs) == reference
    finally:
        rebuilt.drop()
        rebuilt.close()


def test_the_http_routes(projected: tuple[RunQueries, dict[str, str]]) -> None:
    q, runs = projected
    app = FastAPI()
    app.include_router(runs_router(lambda: q.store))
    install_error_handlers(app)
    client = TestClient(app)
    listed = client.get("/runs", params={"model": "digits", "status": "completed"})
    assert listed.status_code == 200
    assert {r["run_id"] for r in listed.json()} == {runs["a"], runs["b"]}
    one = client.get(f"/runs/{runs['b']}").json()
    assert one["version"] == "ver-b" and len(one["curves"]) == 3
    both = client.get("/runs/compare", params={"ids": f"{runs['a']},{runs['b']}"})
    assert both.status_code == 200 and len(both.json()["runs"]) == 2
    repeated = client.get("/runs/compare", params=[("ids", runs["a"]), ("ids", runs["b"])])
    assert repeated.json() == both.json()
    assert client.get("/runs/nosuch").status_code == 404
    assert client.get("/runs/compare", params={"ids": "nosuch"}).status_code == 404
    assert client.get("/runs", params={"status": "done"}).status_code == 422

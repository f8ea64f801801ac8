"""GET /searches/{id} against the real broker: a search's trials as the log has them (a
completed one with its objective, a pruned one with the epoch it stopped after, the best so
far), and 404 for a search that is not on the log."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.tuning.api import Searches, create_router
from mlbus.http import install_error_handlers
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.search import SearchRequested, TrialPruned
from mlbus.schemas.training import (
    PRUNED,
    SearchTrial,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
)
from mlbus.search import parse_space, trial_request_id, trial_run_id

pytestmark = pytest.mark.integration


def test_a_search_is_read_from_the_log(kafka: KafkaConfig) -> None:
    ref = DatasetRef(name="digits", version="v1")
    search = SearchRequested(
        search_id="s-1", model="m", dataset=ref, family="mlp", trials=3, parallel=2,
        space=parse_space("lr: {type: float, low: 1.0e-4, high: 0.1, log: true}"),
    )  # fmt: skip
    events: list = [search]
    for n, lr, accuracy in ((0, 0.01, [0.8, 0.9, 0.95]), (1, 0.0001, [0.1, 0.2])):
        events.append(
            TrainingRequested(
                model="m",
                dataset=ref,
                family="mlp",
                hyperparameters={"lr": lr},
                trial=SearchTrial(search_id="s-1", number=n),
            )
        )
        run = trial_run_id("s-1", n)
        events += [
            TrainingProgress(
                run_id=run,
                model="m",
                epoch=e,
                max_epochs=3,
                metrics={"validation.accuracy": a},
                samples_per_second=1.0,
            )
            for e, a in enumerate(accuracy, 1)
        ]
    done, laggard = trial_run_id("s-1", 0), trial_run_id("s-1", 1)
    events += [
        TrainingCompleted.model_validate(
            {
                "run_id": done, "model": "m", "version": done[:12],
                "request_id": trial_request_id("s-1", 0), "family": "mlp",
                "dataset": ref.model_dump(),
                "artifact": {"uri": "file:///x", "sha256": "sha256:" + "ab" * 32},
                "metrics": {"validation": {"accuracy": 0.95}}, "epochs": 3,
                "code": {"package_version": "0"}, "duration_seconds": 1.0,
            }
        ),
        TrialPruned(
            search_id="s-1", trial=1, model="m", run_id=laggard,
            request_id=trial_request_id("s-1", 1), epoch=2, pruner="median",
        ),
        TrainingFailed(
            run_id=laggard, model="m", request_id=trial_request_id("s-1", 1), reason="pruned",
            retryable=False, error_type=PRUNED, epoch=2, pruned=True,
        ),
    ]  # fmt: skip
    with EventProducer(kafka, source="test") as producer:
        producer.publish(events[0], event_id="s-1")
        for data in events[1:]:
            request_id = None
            if isinstance(data, TrainingRequested) and data.trial is not None:
                request_id = trial_request_id("s-1", data.trial.number)
            producer.publish(data, event_id=request_id)
        producer.flush()

    app = FastAPI()
    install_error_handlers(app)
    searches = Searches(kafka)
    app.include_router(create_router(lambda: searches))
    client = TestClient(app)
    answer = client.get("/searches/s-1")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["counts"] == {
        "requested": 2, "running": 0, "completed": 1, "pruned": 1, "failed": 0,
    }  # fmt: skip
    assert not body["finished"]  # one trial of the budget is still to be requested
    assert body["best"] == {"trial": 0, "run_id": done, "value": 0.95, "params": {"lr": 0.01}}
    pruned = body["trials"][1]
    assert (pruned["state"], pruned["epochs"], pruned["pruned_at_epoch"]) == ("pruned", 2, 2)
    assert pruned["intermediate"] == {"1": 0.1, "2": 0.2}

    missing = client.get("/searches/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "UnknownSearch"
    searches.close()

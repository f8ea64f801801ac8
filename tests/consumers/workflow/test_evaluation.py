"""Re-evaluating a champion on a candidate's test rows, with a real trained artifact: on
the run's own dataset version, seed and split it finds the trainer's own test metrics (so
the split and the preprocessing are the trainer's); on a different version it measures
the champion on that version's rows."""

from __future__ import annotations

from contextlib import closing

import pytest

from mlbus.consumers.workflow.evaluation import ChampionEvaluator
from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.samples import sample_table
from mlbus.datasets.sources import from_table
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import Split, TrainingRequested
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker
from tests.mlbus.kafka.support import read_events, run_to_end
from tests.trainer.test_worker import validate


def test_the_champion_re_evaluated_on_its_own_rows_scores_what_the_trainer_measured(
    kafka, group, tmp_path, request
):
    store = ObjectStore(tmp_path.as_uri())
    table = sample_table("digits")
    with DatasetRegistry(store, kafka) as registry:
        full = registry.register(from_table(table), name="digits", label="label")
        half = registry.register(from_table(table.slice(0, 900)), name="digits", label="label")
    validate(kafka, store)  # the worker trains validated versions only
    with (
        EventProducer(kafka, source="test") as producer,
        closing(TrainingWorker(kafka, store, producer)) as worker,
    ):
        producer.publish(
            TrainingRequested(
                model="digits",
                family="mlp",
                seed=5,
                max_epochs=3,
                dataset=DatasetRef(name="digits", version=full.version),
            )
        )
        run_to_end(
            ConsumerLoop(
                kafka, group=group, long_running=True, handlers={"training.requested": worker}
            ),
            timeout=120,
        )
    (done,) = read_events(kafka, "training.completed")
    run = done.data
    evaluate = ChampionEvaluator(kafka, store)
    request.addfinalizer(evaluate.close)

    same = evaluate(run, run, Split())
    assert same is not None
    assert same["test.accuracy"] == pytest.approx(run.metrics["test"]["accuracy"], abs=1e-6)
    assert same["test.loss"] == pytest.approx(run.metrics["test"]["loss"], rel=1e-4)

    other = run.model_copy(
        update={
            "dataset": DatasetRef(name="digits", version=half.version),
            "seed": 1,
        }
    )
    measured = evaluate(run, other, Split(test=0.2))
    assert measured is not None and 0.5 < measured["test.accuracy"] <= 1.0
    missing = other.model_copy(update={"dataset": DatasetRef(name="digits", version="nope")})
    assert evaluate(run, missing, Split()) is None

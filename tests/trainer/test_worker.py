"""The training worker on the bus: a request for the digits sample becomes
training.started, one training.progress per epoch, and training.completed whose artifact
matches its sha256 and loads back to the same accuracy; bad requests fail, not crash."""

from __future__ import annotations

from mlbus import artifacts
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.storage import ObjectStore
from schemas.base import DatasetRef
from schemas.training import TrainingRequested
from tests.mlbus.kafka.support import read_events, run_to_end
from trainer.worker import TrainingWorker, run_id_for


def _digits(kafka, store):
    from datasets.registry import DatasetRegistry
    from datasets.samples import sample_table
    from datasets.sources import from_table

    return DatasetRegistry(store, kafka).register(
        from_table(sample_table("digits")), name="digits", label="label"
    )


def _run_worker(kafka, group, store):
    with EventProducer(kafka, source="mlbus/trainer") as producer:
        loop = ConsumerLoop(
            kafka, group=group, name="trainer", long_running=True,
            handlers={"training.requested": TrainingWorker(kafka, store, producer)},
        )  # fmt: skip
        return run_to_end(loop, timeout=120)


def test_a_request_trains_the_digits_cnn_and_publishes_the_run(kafka, group, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    with EventProducer(kafka, source="test") as producer:
        request = producer.publish(
            TrainingRequested(
                model="digits", family="cnn", seed=3, max_epochs=15,
                dataset=DatasetRef(name="digits", version=dataset.version[:10]),
            )
        )  # fmt: skip
    stats = _run_worker(kafka, group, store)
    assert stats.handled == 1 and stats.deadlettered == 0

    run_id = run_id_for(request.id)
    started = read_events(kafka, "training.started")
    progress = read_events(kafka, "training.progress")
    (completed,) = read_events(kafka, "training.completed")
    assert [e.data.run_id for e in started] == [run_id]
    assert [e.data.epoch for e in progress] == list(range(1, 16))
    data = completed.data
    assert completed.causationid == request.id and completed.correlationid == request.id
    assert data.run_id == run_id and data.dataset.version == dataset.version
    assert data.metrics["test"]["accuracy"] >= 0.95, data.metrics
    _, card = artifacts.load(
        store, data.artifact.uri, data.artifact.sha256, data.artifact.model_card_uri
    )
    assert card["classes"] == [str(i) for i in range(10)]
    assert len(card["mean"]) == 64 and card["dataset"]["version"] == dataset.version


def test_a_redelivered_request_announces_the_same_completion_without_training(
    kafka, group, tmp_path
):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    payload = TrainingRequested(
        model="digits", family="mlp", max_epochs=2,
        dataset=DatasetRef(name="digits", version=dataset.version),
    )  # fmt: skip
    with EventProducer(kafka, source="test") as producer:
        ref = producer.publish(payload)
    _run_worker(kafka, group, store)
    with EventProducer(kafka, source="test") as producer:  # the same request again
        producer.publish(payload, event_id=ref.id)
    _run_worker(kafka, group, store)
    completed = read_events(kafka, "training.completed")
    assert len(completed) == 2 and len({e.id for e in completed}) == 1
    assert len(read_events(kafka, "training.started")) == 1  # trained once


def test_bad_requests_fail_with_a_reason_and_are_not_retried(kafka, group, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    good = DatasetRef(name="digits", version=dataset.version)
    with EventProducer(kafka, source="test") as producer:
        producer.publish(TrainingRequested(model="a", family="transformer", dataset=good))
        producer.publish(TrainingRequested(model="b", family="mlp", dataset=good,
                                           hyperparameters={"hidden": -1}))  # fmt: skip
        missing = DatasetRef(name="digits", version="ffff")
        producer.publish(TrainingRequested(model="c", family="mlp", dataset=missing))
    stats = _run_worker(kafka, group, store)
    assert stats.handled == 3 and stats.deadlettered == 0
    failed = {e.data.model: e.data for e in read_events(kafka, "training.failed")}
    assert set(failed) == {"a", "b", "c"}
    assert all(not f.retryable for f in failed.values())
    assert "unknown model family 'transformer'" in failed["a"].reason
    assert "hidden=-1" in failed["b"].reason
    assert "digits@ffff" in failed["c"].reason
    assert not read_events(kafka, "training.completed")

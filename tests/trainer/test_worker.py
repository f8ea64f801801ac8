"""The training worker on the bus: a request for the digits sample becomes
training.started, one training.progress per epoch, and training.completed whose artifact
matches its sha256 and loads back to the same accuracy; a worker asked to stop checkpoints
and gives the request back, and the next one resumes it to the same metrics; bad requests
fail, not crash."""

from __future__ import annotations

import contextlib
import socket
import uuid

import torch
from moto.server import ThreadedMotoServer

from mlbus import artifacts
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import FamilyOrigin, TrainingRequested
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker, run_id_for
from tests.conftest import unique
from tests.mlbus.kafka.support import (
    LoopThread,
    committed_offset,
    read_events,
    run_to_end,
    wait_until,
)


def _digits(kafka, store, sample="digits"):
    """A registered and validated sample (the worker trains validated versions only)."""
    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.datasets.samples import sample_table
    from mlbus.datasets.sources import from_table

    with DatasetRegistry(store, kafka) as registry:
        registered = registry.register(
            from_table(sample_table(sample)), name="digits", label="label"
        )
    validate(kafka, store)
    return registered


def validate(kafka, store):
    """Run the validator over everything announced so far."""
    from mlbus.datasets.validator import Validator

    with EventProducer(kafka, source="mlbus/datasets") as producer:
        loop = ConsumerLoop(
            kafka,
            group=unique("validator-"),
            name="validator",
            handlers={"dataset.created": Validator(store, producer)},
        )
        run_to_end(loop)


@contextlib.contextmanager
def _loop(kafka, group, store, producer, torch_threads=0):
    with contextlib.closing(
        TrainingWorker(kafka, store, producer, torch_threads=torch_threads)
    ) as worker:
        yield ConsumerLoop(
            kafka,
            group=group,
            name="trainer",
            long_running=True,
            handlers={"training.requested": worker},
        )


def _run_worker(kafka, group, store, torch_threads=0):
    with (
        EventProducer(kafka, source="mlbus/trainer") as producer,
        _loop(kafka, group, store, producer, torch_threads) as loop,
    ):
        return run_to_end(loop, timeout=120)


def _without_timings(metrics):
    return {split: values for split, values in metrics.items() if split != "inference"}


def test_a_request_trains_the_digits_cnn_and_publishes_the_run(kafka, group, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    with EventProducer(kafka, source="test") as producer:
        request = producer.publish(
            TrainingRequested(
                model="digits",
                family="cnn",
                seed=3,
                max_epochs=15,
                dataset=DatasetRef(name="digits", version=dataset.version[:10]),
            )
        )
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
    assert data.device == ("cuda" if torch.cuda.is_available() else "cpu")
    latency = data.metrics["inference"]
    assert 0 < latency["latency_p50_ms"] <= latency["latency_p95_ms"]
    _, card = artifacts.load(
        store, data.artifact.uri, data.artifact.sha256, data.artifact.model_card_uri
    )
    assert card.classes == [str(i) for i in range(10)]
    assert len(card.mean) == 64 and card.dataset.version == dataset.version
    assert card.metrics == data.metrics  # the latency budget is in the card too
    assert store.exists(f"runs/{run_id}/checkpoint/checkpoint.json")
    assert started[0].data.attempt == 1 and started[0].data.resumed_from_epoch is None


def test_a_stopped_worker_checkpoints_and_the_next_resumes_to_the_same_metrics(
    kafka, group, tmp_path
):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    payload = TrainingRequested(
        model="digits",
        family="cnn",
        seed=4,
        max_epochs=12,
        device="cpu",
        hyperparameters={"batch_size": 16},
        dataset=DatasetRef(name="digits", version=dataset.version),
    )
    with EventProducer(kafka, source="test") as producer:
        interrupted = producer.publish(payload)
    run_id = run_id_for(interrupted.id)
    with (
        EventProducer(kafka, source="mlbus/trainer") as producer,
        _loop(kafka, group, store, producer) as consumer,
    ):
        loop = LoopThread(consumer).start()
        wait_until(lambda: read_events(kafka, "training.progress"), "a first epoch", timeout=60)
        stats = loop.stop()  # as SIGTERM does: the run stops at the next epoch boundary
    assert stats.handled == 0 and stats.deadlettered == 0
    topic = kafka.topic("training.requested")
    assert all(committed_offset(kafka, group, topic, p) is None for p in range(6))
    stopped_at = len(read_events(kafka, "training.progress"))
    assert 1 <= stopped_at < 12, "the run finished before it could be stopped"
    assert store.exists(f"runs/{run_id}/checkpoint/epoch-{stopped_at:04d}.safetensors")
    assert not read_events(kafka, "training.completed")

    with EventProducer(kafka, source="test") as producer:  # the same spec, never interrupted
        whole = producer.publish(payload)
    _run_worker(kafka, group, store)
    started = [e.data for e in read_events(kafka, "training.started")]
    assert [(s.run_id, s.attempt, s.resumed_from_epoch) for s in started] == [
        (run_id, 1, None),
        (run_id, 2, stopped_at),
        (run_id_for(whole.id), 1, None),
    ]
    epochs = [e.data.epoch for e in read_events(kafka, "training.progress")]
    assert epochs == [*range(1, 13), *range(1, 13)]
    completed = {e.data.request_id: e.data for e in read_events(kafka, "training.completed")}
    assert set(completed) == {interrupted.id, whole.id}
    resumed, uninterrupted = completed[interrupted.id], completed[whole.id]
    assert resumed.epochs == uninterrupted.epochs == 12
    assert _without_timings(resumed.metrics) == _without_timings(uninterrupted.metrics)
    assert resumed.confusion_matrix == uninterrupted.confusion_matrix
    assert resumed.artifact.sha256 == uninterrupted.artifact.sha256  # the very same weights


def test_a_redelivered_request_neither_trains_nor_publishes_its_completion_again(
    kafka, group, tmp_path, caplog
):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    payload = TrainingRequested(
        model="digits",
        family="mlp",
        max_epochs=2,
        dataset=DatasetRef(name="digits", version=dataset.version),
    )
    with EventProducer(kafka, source="test") as producer:
        ref = producer.publish(payload)
    caplog.set_level("INFO", logger="mlbus.trainer.worker")
    # MLBUS_TRAINER__TORCH_THREADS: the run trains on 2 intra-op threads (the tests' default
    # is 1, OMP_NUM_THREADS in tests/conftest.py)
    _run_worker(kafka, group, store, torch_threads=2)
    with EventProducer(kafka, source="test") as producer:  # the same request again
        producer.publish(payload, event_id=ref.id)
    _run_worker(kafka, group, store, torch_threads=2)
    trained = [r.getMessage() for r in caplog.records if "intra-op" in r.getMessage()]
    assert trained == [f"trainer: run {run_id_for(ref.id)} on 2 intra-op thread(s)"]
    # The run is finished (its marker) and its completion is on the log: nothing is redone.
    completed = read_events(kafka, "training.completed")
    assert len(completed) == 1 and completed[0].data.run_id == run_id_for(ref.id)
    assert len(read_events(kafka, "training.started")) == 1  # trained once


def test_bad_requests_fail_with_a_reason_and_are_not_retried(kafka, group, tmp_path, monkeypatch):
    store = ObjectStore(tmp_path.as_uri())
    dataset = _digits(kafka, store)
    good = DatasetRef(name="digits", version=dataset.version)
    # Plugin families known only when a run builds them: one raises, one builds no module,
    # one is another version of the installed example plugin.
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    plugins.joinpath("worker_quick_family.py").write_text(
        "def raises(shape, n, p):\n    raise ValueError('needs colour images')\n\n"
        "def nothing(shape, n, p):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(plugins))
    other = FamilyOrigin(
        reference="mlbus_resnet:family", distribution="mlbus-resnet-family", version="9.9"
    )
    with EventProducer(kafka, source="test") as producer:
        producer.publish(
            TrainingRequested(model="f", family="worker_quick_family:raises", dataset=good)
        )
        producer.publish(
            TrainingRequested(model="g", family="worker_quick_family:nothing", dataset=good)
        )
        producer.publish(
            TrainingRequested(model="h", family="resnet", dataset=good, family_origin=other)
        )
        producer.publish(
            TrainingRequested(
                model="i", family="mlp", dataset=good, task="regression", max_epochs=1
            )
        )
        producer.publish(TrainingRequested(model="a", family="transformer", dataset=good))
        producer.publish(
            TrainingRequested(model="b", family="mlp", dataset=good, hyperparameters={"hidden": -1})
        )
        missing = DatasetRef(name="digits", version="ffff")
        producer.publish(TrainingRequested(model="c", family="mlp", dataset=missing))
        producer.publish(TrainingRequested(model="d", family="mlp", dataset=good, device="cuda:99"))
        producer.publish(TrainingRequested(model="e", family="mlp", dataset=good, device="tpu"))
    stats = _run_worker(kafka, group, store)
    assert stats.handled == 9 and stats.deadlettered == 0
    failed = {e.data.model: e.data for e in read_events(kafka, "training.failed")}
    assert set(failed) == {"a", "b", "c", "d", "e", "f", "g", "h"}
    assert "failed to build for input [64]: ValueError: needs colour images" in failed["f"].reason
    assert "returned a NoneType, not a torch.nn.Module" in failed["g"].reason
    assert "needs distribution mlbus-resnet-family 9.9" in failed["h"].reason
    assert all(not f.retryable for f in failed.values())
    assert "unknown model family 'transformer'" in failed["a"].reason
    assert "hidden=-1" in failed["b"].reason
    assert "digits@ffff" in failed["c"].reason
    assert "'cuda:99' requested but" in failed["d"].reason and "CUDA" in failed["d"].reason
    assert "unknown device 'tpu'" in failed["e"].reason
    # Digits' int labels are numbers: a regression on them trains (the one completion).
    (done,) = read_events(kafka, "training.completed")
    assert done.data.model == "i" and done.data.task == "regression"


def test_an_unreachable_object_store_is_retried_and_reported_retryable(kafka, group):
    # An S3 API of this test's own, stopped and started again on the same port: the store
    # is down in between (moto keeps its buckets in the process).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    bucket = f"trainer-{uuid.uuid4().hex[:8]}"
    options = {
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    try:
        store = ObjectStore(
            f"s3://{bucket}/root",
            s3_endpoint_url=f"http://127.0.0.1:{port}",
            storage_options=options,
        )
        store.fs.mkdir(bucket, region_name="eu-west-1")
        dataset = _digits(kafka, store, sample="iris")  # small: every request goes to moto
        with EventProducer(kafka, source="test") as producer:
            request = producer.publish(
                TrainingRequested(
                    model="digits",
                    family="mlp",
                    max_epochs=2,
                    dataset=DatasetRef(name="digits", version=dataset.version),
                )
            )
        server.stop()  # the object store goes down
        with (
            EventProducer(kafka, source="mlbus/trainer") as producer,
            _loop(kafka, group, store, producer) as consumer,
        ):
            loop = LoopThread(consumer).start()
            wait_until(lambda: read_events(kafka, "training.failed"), "a failure notice")
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()  # back up
            wait_until(lambda: read_events(kafka, "training.completed"), "the run", timeout=60)
            stats = loop.stop()
    finally:
        server.stop()
    assert stats.retries >= 1 and stats.handled == 1 and stats.deadlettered == 0
    failed = [e.data for e in read_events(kafka, "training.failed")]
    assert all(f.retryable and "object store unreachable" in f.reason for f in failed), failed
    (completed,) = read_events(kafka, "training.completed")
    assert completed.data.run_id == run_id_for(request.id)

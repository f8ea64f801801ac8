"""A user's model family and a regression model through the whole loop, with real parts
(broker, S3 API, trainer, validator, workflow, model server): the example plugin
distribution (examples/mlbus-resnet-family, installed as a user's package is) trains on
digits as [1, 8, 8] image tensors, is promoted, and serves over OIP with image-shaped input;
its run names the plugin's distribution and version; a model whose plugin this replica does
not have (not installed, or another version) is refused with deployment.updated and the
previous version goes on serving. A regression model trained on the diabetes sample is
promoted by an RMSE policy (mode min) and serves its predictions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from mlbus import artifacts
from mlbus.consumers.lineage.rebuild import rebuild
from mlbus.consumers.lineage.runs import RunDetail, RunQueries
from mlbus.consumers.lineage.store import LineageStore, staging_for, swap_in
from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.samples import sample_table
from mlbus.datasets.sources import from_table
from mlbus.datasets.validator import Validator
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import LogRecord, TopicReader
from mlbus.ml.card import ModelCard
from mlbus.schemas.training import Artifact
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker
from tests.consumers.workflow.support import at_least, running
from tests.mlbus.kafka.support import LoopThread, read_events, wait_until
from tests.mlbus.storage_support import s3_store
from tests.mlbus.test_cli import clean_env, mlbus, ok
from tests.serving.conftest import promote, wait_version
from tests.serving.conftest import running as serving

pytestmark = pytest.mark.integration

RESNET = """\
name: {name}
dataset: {dataset}
model: {model}
family: resnet
hyperparameters: {{width: 16, blocks: 1, lr: 0.01}}
max_epochs: 3
policy:
  name: images-accuracy
  metric: test.accuracy
  thresholds:
    - {{metric: test.accuracy, op: ">=", value: 0.8}}
"""

DIABETES = """\
name: {name}
dataset: {dataset}
model: {model}
family: mlp
task: regression
loss: huber
hyperparameters: {{hidden: 32, lr: 0.01, dropout: 0.0}}
max_epochs: 30
policy:
  name: diabetes-rmse
  metric: test.rmse
  mode: min
  thresholds:
    - {{metric: test.rmse, op: "<=", value: 75}}
    - {{metric: test.r2, op: ">=", value: 0.2}}
"""


@contextmanager
def pipeline(
    kafka: KafkaConfig, group: str, store: ObjectStore, tmp_path: Path, text: str
) -> Iterator[dict[str, str]]:
    """A pipeline applied with the CLI, then a trainer, a validator and the workflow
    running in threads until the block ends."""
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    ok(mlbus("pipelines", "apply", str(path), "--actor", "user:ci", env=env))
    with (
        EventProducer(kafka, source="test/trainer") as trainer_out,
        EventProducer(kafka, source="test/validator") as validator_out,
    ):
        worker = TrainingWorker(kafka, store, trainer_out)
        trainer = ConsumerLoop(
            kafka,
            group=group + "-trainer",
            name="trainer",
            long_running=True,
            handlers={"training.requested": worker},
        )
        validator = ConsumerLoop(
            kafka,
            group=group + "-validator",
            name="validator",
            handlers={"dataset.created": Validator(store, validator_out)},
        )
        with closing(worker), LoopThread(trainer), LoopThread(validator), running(kafka, group):
            yield env


def _deployments(kafka: KafkaConfig, model: str, version: str, status: str) -> list:
    return [
        e.data
        for e in read_events(kafka, "deployment.updated")
        if (e.data.model, e.data.version, e.data.status) == (model, version, status)
    ]


def _with_card(store: ObjectStore, done: Artifact, prefix: str, **changes: object) -> Artifact:
    """The same weights under `prefix`, with a card changed as another trainer would have
    written it (a plugin at another version, or one this replica never had)."""
    model, card = artifacts.load(store, done.uri, done.sha256, done.model_card_uri or "")
    changed = ModelCard.model_validate(card.model_dump() | changes)
    return Artifact(**artifacts.save(store, prefix, model, changed))


def test_a_plugin_family_trains_on_image_tensors_is_promoted_and_served(kafka, group, tmp_path, s3):
    store = s3_store(s3)
    model = "digits-resnet"
    text = RESNET.format(name="images", dataset="digits_images", model=model)
    with pipeline(kafka, group, store, tmp_path, text):
        with DatasetRegistry(store, kafka) as registry:
            registry.register(
                from_table(sample_table("digits_images")), name="digits_images", label="label"
            )
        (promoted,) = at_least(kafka, "model.promoted", 1, timeout=600)  # contended CI

    (request,) = read_events(kafka, "training.requested")
    (done,) = read_events(kafka, "training.completed")
    assert request.data.family == "resnet" and promoted.data.version == done.data.version
    # The workflow's request names the plugin as `pipelines apply` resolved it.
    assert request.data.family_origin is not None
    assert request.data.family_origin.distribution == "mlbus-resnet-family"
    origin = done.data.family_origin
    assert origin is not None
    assert (origin.distribution, origin.version) == ("mlbus-resnet-family", "0.1.0")
    assert origin.reference == "mlbus_resnet:family" and origin.digest.startswith("sha256:")
    assert done.data.input_shape == [1, 8, 8] and done.data.task == "classification"
    assert done.data.metrics["test"]["accuracy"] >= 0.8
    card = json.loads(store.read_bytes(store.key_of(done.data.artifact.model_card_uri)))
    assert card["family_origin"]["distribution"] == "mlbus-resnet-family"
    assert card["family_origin"]["version"] == "0.1.0" and card["input_shape"] == [1, 8, 8]

    # The lineage store, folded from this log as `mlbus lineage rebuild` does, names the
    # plugin's distribution and version on the run.
    run = _run_in_lineage(kafka, tmp_path, done.data.run_id)
    assert run.details["family_origin"]["distribution"] == "mlbus-resnet-family"
    assert run.details["family_origin"]["version"] == "0.1.0"

    images = sample_table("digits_images")
    x = np.asarray(images.column("image").combine_chunks().flatten(), dtype=np.float32)
    x = x.reshape(-1, 1, 8, 8)[:50]
    truth = images.column("label").to_numpy()[:50]
    version = promoted.data.version
    with serving(kafka, store) as srv, srv.client() as c:
        wait_version(srv, model, version)
        meta = c.get(f"/v2/models/{model}").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["parameters"]["family_origin"]["version"] == "0.1.0"
        answer = _infer(c, model, x)
        assert answer.status_code == 200, answer.text
        (label,) = [o for o in answer.json()["outputs"] if o["name"] == "label"]
        assert np.mean(np.asarray(label["data"], dtype=int) == truth) >= 0.8
        flat = _infer(c, model, x.reshape(len(x), 64))
        assert flat.status_code == 400 and "shape must be [batch, 1, 8, 8]" in flat.text

        # Another version of the plugin, and a plugin this replica never had: each refused
        # once, naming what is missing; the promoted version goes on serving.
        art = done.data.artifact
        newer = origin.model_copy(update={"version": "0.2.0"})
        promote(kafka, model, "v-newer", _with_card(store, art, "m/newer", family_origin=newer))
        absent = origin.model_copy(update={"distribution": "mlbus-vit-family", "version": "1.0"})
        promote(
            kafka,
            model,
            "v-absent",
            _with_card(store, art, "m/absent", family="vit", family_origin=absent),
        )
        (newer_failed,) = wait_until(
            lambda: _deployments(kafka, model, "v-newer", "failed"), "v-newer refused"
        )
        (absent_failed,) = wait_until(
            lambda: _deployments(kafka, model, "v-absent", "failed"), "v-absent refused"
        )
        assert "needs distribution mlbus-resnet-family 0.2.0" in newer_failed.error
        assert "this process has mlbus-resnet-family 0.1.0" in newer_failed.error
        assert "mlbus-vit-family 1.0, which is not installed here" in absent_failed.error
        again = _infer(c, model, x[:2])
        assert again.status_code == 200 and again.json()["model_version"] == version


def test_a_regression_model_on_diabetes_is_promoted_by_rmse_and_served(kafka, group, tmp_path):
    store = ObjectStore(tmp_path.joinpath("objects").as_uri())
    model = "diabetes"
    text = DIABETES.format(name="diabetes", dataset="diabetes", model=model)
    with pipeline(kafka, group, store, tmp_path, text):
        with DatasetRegistry(store, kafka) as registry:
            registry.register(from_table(sample_table("diabetes")), name="diabetes", label="label")
        (promoted,) = at_least(kafka, "model.promoted", 1, timeout=600)

    (request,) = read_events(kafka, "training.requested")
    (done,) = read_events(kafka, "training.completed")
    assert (request.data.task, request.data.loss) == ("regression", "huber")
    assert done.data.task == "regression" and done.data.confusion_matrix is None
    test = done.data.metrics["test"]
    assert set(test) == {"loss", "rmse", "mae", "r2"} and test["rmse"] <= 75
    assert promoted.data.evidence["mode"] == "min"
    assert promoted.data.evidence["metric"] == "test.rmse"
    shown = _run_in_lineage(kafka, tmp_path, done.data.run_id)  # what `mlbus runs show` reads
    assert shown.metrics["test.rmse"] == test["rmse"] and shown.status == "completed"

    table = sample_table("diabetes")
    features = [c for c in table.column_names if c != "label"]
    x = np.stack([table.column(f).to_numpy() for f in features], axis=1).astype(np.float32)
    y = table.column("label").to_numpy()
    with serving(kafka, store) as srv, srv.client() as c:
        wait_version(srv, model, promoted.data.version)
        meta = c.get(f"/v2/models/{model}").json()
        assert meta["inputs"][0]["shape"] == [-1, 10]
        assert meta["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1, 1]}]
        answer = _infer(c, model, x[:100])
        assert answer.status_code == 200, answer.text
        (out,) = answer.json()["outputs"]
        assert out["name"] == "prediction" and out["shape"] == [100, 1]
        predicted = np.asarray(out["data"])
        # Predictions in the target's units (25-346), better than the mean on these rows.
        assert 25 <= predicted.mean() <= 346
        assert np.sqrt(np.mean((predicted - y[:100]) ** 2)) < np.std(y[:100])


def _run_in_lineage(kafka: KafkaConfig, tmp_path: Path, run_id: str) -> RunDetail:
    """The run as the lineage store shows it, folded from this test's log the way `mlbus
    lineage rebuild` does."""
    lineage = LineageStore.open(f"sqlite:///{tmp_path / 'lineage.db'}")
    staging = staging_for(lineage)
    topics = ("dataset.created", "training.requested", "training.started", "training.completed")
    reader = TopicReader(kafka, [kafka.topic(t) for t in topics], start="beginning")
    rebuild(staging, (LogRecord.from_message(m, kafka) for m in reader))
    swap_in(staging, lineage)
    lineage.close()
    with closing(LineageStore.open(lineage.url)) as projected:
        return RunQueries(projected).show(run_id)


def _infer(c: httpx.Client, model: str, x: np.ndarray) -> httpx.Response:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return c.post(
        f"/v2/models/{model}/infer", json={"inputs": [tensor | {"data": x.reshape(-1).tolist()}]}
    )

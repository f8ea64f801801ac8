"""A trainer killed (SIGKILL) between publishing a run's completion and committing its
request's offset. What the log then holds depends on the broker, and the test states both:

- a configured cluster (Apache Kafka, Redpanda, MSK, Confluent: `MLBUS_TEST_KAFKA_BOOTSTRAP`):
  the completion and the offset commit are one transaction, the killed worker's copy is never
  visible to read_committed readers, and the log shows exactly one completion: the one the
  worker that took the request over committed with its offset;
- the embedded broker (Tansu 0.6), where mlbus does not use transactions (it never ends a
  dead producer's transaction, and read_committed readers stop there for good: docs/broker.md):
  the killed worker's copy and the next worker's are on the log with the same event id, and
  downstream there is no second effect (the workflow decides on the run once).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from mlbus.consumers.workflow.state import decision_id
from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.samples import sample_table
from mlbus.datasets.sources import from_table
from mlbus.errors import Abandon
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.transaction import Transactional
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event
from mlbus.schemas.training import TrainingFailed, TrainingRequested, run_id_for
from mlbus.services import service
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker
from tests.consumers.workflow.support import catch_up, decisions, define, pipeline_text
from tests.mlbus.kafka.support import (
    LoopThread,
    Script,
    committed_offset,
    read_events,
    run_to_end,
)
from tests.mlbus.test_cli import clean_env
from tests.trainer.test_cli import FAST
from tests.trainer.test_worker import validate

pytestmark = pytest.mark.integration

CRASHING = Path(__file__).with_name("crash_before_commit.py")


def test_a_trainer_killed_between_publish_and_commit_leaves_one_completion(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    store = ObjectStore((data_dir / "objects").as_uri())  # the workers' default store
    with DatasetRegistry(store, kafka) as registry:
        dataset = registry.register(from_table(sample_table("iris")), name="iris", label="label")
    validate(kafka, store)
    define(kafka, pipeline_text(dataset="iris", model="iris"))  # governs the model's runs
    with EventProducer(kafka, source="test") as producer:
        request = producer.publish(
            TrainingRequested(
                model="iris",
                family="mlp",
                max_epochs=2,
                dataset=DatasetRef(name="iris", version=dataset.version),
            )
        )
    group = service("trainer").group_id(kafka.topic_prefix)
    topic = kafka.topic("training.requested")

    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(data_dir),
    )
    transactions = not kafka.embedded  # what `mlbus trainer` chooses by default
    # The session broker is given to the worker as a configured cluster: say which it is.
    chosen = {"MLBUS_TRAINER__TRANSACTIONS": str(transactions).lower(), "OMP_NUM_THREADS": "1"}
    script = tmp_path / CRASHING.name  # its log goes beside it
    shutil.copy(CRASHING, script)
    crashing = Script(script, [], env=env | FAST | chosen)
    assert crashing.wait(240) == -signal.SIGKILL, crashing.log()
    assert all(committed_offset(kafka, group, topic, p) is None for p in range(6))
    killed_copies = len(read_events(kafka, "training.completed"))
    assert killed_copies == (0 if transactions else 1)

    # Another worker of the group takes the request over: the run is done (its marker is on
    # the store), so it publishes the same completion, with the offset, in one transaction.
    with (
        EventProducer(kafka, source="mlbus/trainer") as producer,
        contextlib.closing(
            TrainingWorker(kafka, store, producer, transactions=Transactional(kafka, prefix=group))
        ) as worker,
    ):
        loop = ConsumerLoop(
            kafka,
            group=group,
            name="trainer",
            long_running=True,
            handlers={"training.requested": worker},
        )
        stats = run_to_end(loop)
    assert stats.handled == 1 and stats.deadlettered == 0
    committed = [committed_offset(kafka, group, topic, p) for p in range(6)]
    assert sorted(o for o in committed if o is not None) == [1]
    assert len(read_events(kafka, "training.started")) == 1  # trained once, by the killed one

    completions = read_events(kafka, "training.completed")
    assert len({e.id for e in completions}) == 1
    assert {e.data.run_id for e in completions} == {run_id_for(request.id)}
    # A cluster: the killed worker's copy never became visible. Tansu: it is there too.
    assert len(completions) == (1 if transactions else 2)

    # Downstream: the workflow decides on the run once, whatever the number of copies.
    catch_up(kafka, "workflow-" + uuid.uuid4().hex[:8])
    made = decisions(kafka)
    assert len(made["model.promoted"]) + len(made["model.rejected"]) == 1
    (decision,) = made["model.promoted"] + made["model.rejected"]
    assert decision.id == decision_id(completions[0].id)


def test_a_transaction_publishes_the_outcome_and_commits_the_offset_together(
    kafka: KafkaConfig, group: str
) -> None:
    """The transactional path itself, from a long-running handler's thread (as the worker
    runs): the outcome is visible and the offset committed, though the loop commits nothing
    (the handler gives its record back right after)."""
    with EventProducer(kafka, source="test") as producer:
        request = producer.publish(
            TrainingRequested(model="m", family="mlp", dataset=DatasetRef(name="d", version="v"))
        )
    transactions = Transactional(kafka, prefix=group)

    def handler(event: Event, record: Record) -> None:
        outcome = wrap(
            TrainingFailed(
                run_id=run_id_for(event.id),
                model="m",
                request_id=event.id,
                reason="test",
                retryable=False,
            ),
            source="test",
            causation=event,
        )
        transactions.finish(record, [outcome])
        raise Abandon("the loop must not commit this record itself")

    loop = ConsumerLoop(
        kafka, group=group, long_running=True, handlers={"training.requested": handler}
    )
    try:
        stats = LoopThread(loop).start().join(120)
    finally:
        transactions.close()
    assert stats.handled == 0 and stats.commits == 0
    (failed,) = read_events(kafka, "training.failed")
    assert failed.causationid == request.id
    topic = kafka.topic("training.requested")
    committed = [committed_offset(kafka, group, topic, p) for p in range(6)]
    assert sorted(o for o in committed if o is not None) == [1]

"""The event producer: what it writes is a structured-mode CloudEvent that any Kafka client
reads (checked with a plain confluent-kafka consumer), keyed by the topic's entity; and a
delivery the broker does not confirm is an error, never a silent success."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from mlbus.broker import free_port
from mlbus.errors import DeliveryError, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import decode
from tests.mlbus.kafka.support import progress, read_raw, requested

WHEN = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def test_published_event_is_a_structured_cloudevent_keyed_by_its_entity(kafka):
    payload = requested(model="digits-mlp", hyperparameters={"lr": 0.01}, seed=7)
    with EventProducer(kafka, source="mlbus/test") as producer:
        ref = producer.publish(payload, subject="digits-mlp@v1", correlationid="run-1", time=WHEN)

    [message] = read_raw(kafka, kafka.topic("training.requested"))
    assert message.key() == b"digits-mlp"  # the topic's key field: the model name
    assert message.headers() == [("content-type", b"application/cloudevents+json")]
    assert json.loads(message.value()) == {
        "specversion": "1.0",
        "id": ref.id,
        "source": "mlbus/test",
        "type": "training.requested",
        "time": "2026-11-21T12:00:00Z",
        "subject": "digits-mlp@v1",
        "datacontenttype": "application/json",
        "dataschema": "mlbus:schemas/training.requested/1",
        "correlationid": "run-1",
        "partitionkey": "digits-mlp",  # the CloudEvents Kafka binding's key extension
        "data": {
            "model": "digits-mlp",
            "dataset": {"name": "digits", "version": "v1"},
            "family": "mlp",
            "hyperparameters": {"lr": 0.01},
            "seed": 7,
            "max_epochs": 10,
            "split": {"validation": 0.15, "test": 0.15},
            "workers": 1,
        },
    }
    assert (ref.type, ref.key, ref.correlationid) == ("training.requested", "digits-mlp", "run-1")
    assert decode(message.value(), expected_type="training.requested").data == payload


def test_follow_up_events_carry_causation_and_correlation(kafka):
    with EventProducer(kafka, source="mlbus/test") as producer:
        cause = producer.publish(requested(model="iris-mlp"))
        effect = producer.publish(progress(model="iris-mlp"), causation=cause)
        other = producer.publish(progress(model="wine-mlp"), key="explicit-key")

    bodies = {m.key(): json.loads(m.value()) for m in read_raw(kafka, kafka.topic(effect.type))}
    assert bodies.keys() == {b"iris-mlp", b"explicit-key"}
    caused, keyed = bodies[b"iris-mlp"], bodies[b"explicit-key"]
    assert cause.correlationid == cause.id and cause.causationid is None
    assert caused["id"] == effect.id
    assert caused["causationid"] == cause.id
    assert caused["correlationid"] == cause.id
    assert keyed["id"] == other.id
    assert "causationid" not in keyed  # absent attributes are left out, not null


def test_send_keeps_an_existing_events_identity(kafka):
    original = decode(
        json.dumps(
            {
                "specversion": "1.0",
                "id": "upstream-42",
                "source": "etl/nightly",
                "type": "training.progress",
                "time": "2026-11-21T12:00:00Z",
                "data": progress(model="wine-mlp").model_dump(mode="json"),
            }
        ).encode()
    )
    with EventProducer(kafka, source="mlbus/relay") as producer:
        producer.send(original)

    [message] = read_raw(kafka, kafka.topic("training.progress"))
    assert message.key() == b"wine-mlp"
    assert decode(message.value()) == original
    assert json.loads(message.value())["source"] == "etl/nightly"


def _unreachable() -> KafkaConfig:
    return KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there


def test_flush_raises_delivery_error_when_the_broker_is_unreachable():
    producer = EventProducer(_unreachable(), source="mlbus/test", **{"message.timeout.ms": 1000})
    producer.publish(requested())
    with pytest.raises(DeliveryError, match="not delivered") as raised:
        producer.flush(timeout=20)
    assert isinstance(raised.value, TransientError)  # the consumer loop retries it


def test_context_exit_raises_delivery_error_when_the_broker_is_unreachable():
    with (
        pytest.raises(DeliveryError),
        EventProducer(_unreachable(), source="mlbus/test", **{"message.timeout.ms": 1000}) as p,
    ):
        p.publish(requested())


def test_flush_raises_delivery_error_when_confirmation_does_not_come_in_time():
    producer = EventProducer(_unreachable(), source="mlbus/test", **{"message.timeout.ms": 60_000})
    producer.publish(requested())
    with pytest.raises(DeliveryError, match="not confirmed"):
        producer.flush(timeout=0.5)

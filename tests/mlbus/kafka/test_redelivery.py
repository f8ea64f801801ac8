"""At-least-once delivery with effects that happen once: a consumer killed (SIGKILL) after its
handler's effect is durable but before the offset is committed gets the record again after a
restart, and the handler's idempotency by event id keeps the effect single.

The consumer runs as its own process, and its effect lives in SQL (SQLite, and PostgreSQL when
configured), as a real service's would.
"""

from __future__ import annotations

import uuid
from collections import Counter

import sqlalchemy as sa

from tests.mlbus.kafka.support import dataset, dead_letters, kafka_arg, lines, publish, wait_until

CONSUMER = '''\
"""Adds each dataset's rows to a per-name total in SQL. Effects are idempotent by event id:
the event id is recorded in the same transaction as the total it changed, so a redelivered
event changes nothing. Every delivery is appended to an attempts log. With a target event id,
the handler stops after that event's effect is committed to SQL and before the loop can commit
the offset: the test SIGKILLs it there."""
import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop

kafka = KafkaConfig(**json.loads(sys.argv[1]))
group, url, suffix, attempts, marker, target = sys.argv[2:8]
engine = sa.create_engine(url)
SEEN = sa.text(
    f"INSERT INTO seen_{suffix} (event_id, name) VALUES (:id, :name) "
    "ON CONFLICT (event_id) DO NOTHING"
)
ADD = sa.text(
    f"INSERT INTO totals_{suffix} (name, total) VALUES (:name, :rows) "
    f"ON CONFLICT (name) DO UPDATE SET total = totals_{suffix}.total + excluded.total"
)


def handle(event, record):
    with open(attempts, "a") as f:
        f.write(event.id + "\\n")
    with engine.begin() as conn:
        params = {"id": event.id, "name": event.data.name, "rows": event.data.num_rows}
        if conn.execute(SEEN, params).rowcount == 1:  # first delivery of this id
            conn.execute(ADD, params)
    if event.id == target:
        Path(marker).write_text(event.id)
        time.sleep(600)  # killed here: effect durable, offset not committed


loop = ConsumerLoop(kafka, group=group, handlers={"dataset.created": handle}, name="redelivery")
print("stopped:", loop.run(stop_at_end=True), flush=True)
'''


def test_sigkill_between_effect_and_commit_redelivers_and_the_effect_happens_once(
    kafka, group, sql_url, tmp_path, spawn
):
    suffix = uuid.uuid4().hex[:8]
    engine = sa.create_engine(sql_url)
    with engine.begin() as conn:
        for ddl in (
            f"CREATE TABLE seen_{suffix} (event_id VARCHAR(64) PRIMARY KEY, name VARCHAR(128))",
            f"CREATE TABLE totals_{suffix} (name VARCHAR(128) PRIMARY KEY, total BIGINT)",
        ):
            conn.execute(sa.text(ddl))

    # One key, so one partition in this order; row counts are powers of two, so the total
    # tells which event, if any, was counted twice.
    refs = publish(kafka, [dataset(version=f"v{i}", num_rows=2**i) for i in range(6)])
    ids = [r.id for r in refs]
    target = ids[2]
    attempts, marker = tmp_path / "attempts.txt", tmp_path / "marker.txt"

    def args(target_id: str) -> list[str]:
        return [kafka_arg(kafka), group, sql_url, suffix, str(attempts), str(marker), target_id]

    def seen() -> Counter[str]:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT event_id FROM seen_{suffix}")).scalars()
            return Counter(rows)

    def total() -> int | None:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT total FROM totals_{suffix}")).scalar_one_or_none()

    try:
        first = spawn(CONSUMER, args(target))
        wait_until(
            lambda: marker.exists() or not first.running(),
            lambda: f"the consumer to reach the target event; log:\n{first.log()}",
        )
        assert first.running(), f"the consumer ended before the target event:\n{first.log()}"
        first.process.kill()  # SIGKILL: no shutdown, no commit
        first.wait()
        assert seen()[target] == 1, "precondition: the target's effect was durable before the kill"
        assert Counter(lines(attempts))[target] == 1

        second = spawn(CONSUMER, args("-"))  # same group, no target
        assert second.wait() == 0, second.log()

        deliveries = Counter(lines(attempts))
        assert deliveries[target] == 2, f"the target was delivered {deliveries[target]} time(s)"
        assert set(deliveries) == set(ids), "an event was never delivered"
        assert seen() == Counter(ids), "an effect is missing or happened twice"
        assert total() == 2**6 - 1, "an event's rows were added twice (or not at all)"
        assert dead_letters(kafka) == [], "the redelivered record was dead-lettered"
    finally:
        engine.dispose()

"""From a replica splitting real requests to the auditor's answer: requests a running replica
answers during a canary are logged, the lineage store projects the log, and the audit of a
request id the candidate answered names the rollout, the weights in force and who started
it; one the stable version answered names its promotion — all verified against the log."""

from __future__ import annotations

from pathlib import Path

from mlbus.consumers.lineage.audit import REQUEST_TOPICS, request_plan, topics_of, verify
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.store import LineageStore
from mlbus.consumers.workflow import commands
from mlbus.kafka.reader import read_log
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import body, running, wait_version
from tests.serving.test_traffic import MODEL, answer, routed, versions  # noqa: F401 - fixture


def test_a_request_the_canary_answered_is_audited_to_its_rollout(
    kafka,
    store,
    digits,
    versions,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    rows = digits.x[:1]
    with running(kafka, store, max_wait_us=0) as srv:
        wait_version(srv, MODEL, "1")
        started = commands.promote(
            kafka, MODEL, "2", reason="try v2", actor="alice", strategy="canary", weight=10
        )
        routed(srv, 10)
        with srv.client() as client:
            answered = {
                rid: answer(client, rows, json={**body(rows), "id": rid})
                for rid in (f"audited-{i}" for i in range(60))
            }

        def logged() -> bool:
            found = {e.data.request_id for e in read_events(kafka, "inference.logged")}
            return set(answered) <= found

        wait_until(logged, "the answers in inference.logged")
    on_candidate = next(rid for rid, version in answered.items() if version == "2")
    on_stable = next(rid for rid, version in answered.items() if version == "1")

    lineage = LineageStore.open(f"sqlite:///{tmp_path / 'lineage.db'}")
    try:
        Projector(lineage).project(read_log(kafka, TOPICS))
        done = request_plan(lineage, on_candidate, read_log(kafka, REQUEST_TOPICS), MODEL)
        assert done.report is not None
        verify(done.report, read_log(kafka, topics_of(done.report)))
        assert done.ok, done.report.events
        [a] = done.answers
        served = a.served
        assert (a.replica, served.version, served.role) == ("test-replica", "2", "candidate")
        assert served.split.weights == {"1": 90, "2": 10}
        assert served.rollout is not None
        assert served.rollout.rollout_id == started.data.rollout_id
        assert [(c.status, c.actor, c.reason) for c in served.rollout.changes] == [
            ("started", "alice", "try v2")
        ]
        assert {"model.traffic", "inference.logged", "training.completed"} <= {
            e.type for e in done.report.events
        }

        stable = request_plan(lineage, on_stable, read_log(kafka, REQUEST_TOPICS))
        [b] = stable.answers
        assert (b.served.version, b.served.role) == ("1", "stable")
        assert b.served.promotion is not None and b.served.promotion.reason == "first"
    finally:
        lineage.close()

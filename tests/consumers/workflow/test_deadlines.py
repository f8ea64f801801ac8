"""Sweeps have a deadline: a run lost with its worker (no outcome ever) is declared failed by
the workflow (a `training.failed` with error_type DeadlineExceeded, an event in the log) and
the sweep is decided on the runs it has. A retryable failure notice is not an outcome, a late
completion does not reopen the sweep, and a rebuild from the log sees the same outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mlbus.consumers.workflow.service import WorkflowService
from mlbus.consumers.workflow.state import deadline_id, read_state
from mlbus.schemas.training import DEADLINE_EXCEEDED, TrainingFailed, run_id_for
from tests.consumers.workflow.support import (
    catch_up,
    completed,
    decisions,
    define,
    pipeline_text,
    running,
    send,
    validated,
)
from tests.mlbus.kafka.support import read_events, run_to_end, wait_until

pytestmark = pytest.mark.integration


def _deadline_failures(kafka):
    return [e for e in read_events(kafka, "training.failed") if e.source == "mlbus/workflow"]


def test_a_sweep_with_a_lost_run_is_decided_at_its_deadline(kafka, group):
    sweep = "sweep: {hidden: [16, 32, 64]}\ndeadline_seconds: 3600\n"
    define(kafka, pipeline_text(extra=sweep))
    before = datetime.now(UTC)
    send(kafka, validated("iris", "v1"))
    catch_up(kafka, group)
    requests = {r.data.sweep.index: r for r in read_events(kafka, "training.requested")}
    assert sorted(requests) == [0, 1, 2]
    (deadline,) = {r.data.sweep.deadline for r in requests.values()}
    assert before + timedelta(seconds=3600) <= deadline <= datetime.now(UTC) + timedelta(hours=1)

    # Two runs finish; the third one's worker is lost after a transient failure notice.
    send(
        kafka,
        completed("m1", "s0", 0.93, request_id=requests[0].id),
        completed("m1", "s1", 0.97, request_id=requests[1].id),
        TrainingFailed(
            run_id=run_id_for(requests[2].id),
            model="m1",
            request_id=requests[2].id,
            reason="object store unreachable; retrying",
            retryable=True,
        ),
    )
    catch_up(kafka, group)
    assert decisions(kafka) == {"model.promoted": [], "model.rejected": []}  # still waiting
    assert _deadline_failures(kafka) == []

    # The clock passes the deadline (what the service's timer does, at a chosen time).
    with WorkflowService(kafka, group=group) as service:
        run_to_end(service.loop, timeout=60)
        service.expire(deadline - timedelta(seconds=1))
        assert _deadline_failures(kafka) == []  # not yet due
        service.expire(deadline + timedelta(seconds=1))
        service.expire(deadline + timedelta(seconds=2))  # once only

    (expired,) = _deadline_failures(kafka)
    assert expired.id == deadline_id(requests[2].id)
    assert expired.causationid == requests[2].id
    assert expired.correlationid == requests[2].correlationid
    data = expired.data
    assert (data.request_id, data.run_id) == (requests[2].id, run_id_for(requests[2].id))
    assert data.error_type == DEADLINE_EXCEEDED and not data.retryable
    assert data.reason.startswith("deadline: ")
    (promoted,) = read_events(kafka, "model.promoted")
    (rejected,) = read_events(kafka, "model.rejected")
    assert promoted.data.version == "s1" and promoted.data.evidence["sweep_runs"] == 2
    assert rejected.data.version == "s0"

    # The lost run turns up after all, better than the winner: the sweep stays decided.
    send(kafka, completed("m1", "late", 0.99, request_id=requests[2].id))
    catch_up(kafka, group)
    catch_up(kafka, group + "-fresh")  # every record again, from the beginning
    assert [e.data.version for e in read_events(kafka, "model.promoted")] == ["s1"]
    assert [e.data.version for e in read_events(kafka, "model.rejected")] == ["s0"]
    assert len(_deadline_failures(kafka)) == 1

    # A rebuild from the log has the same outcomes, whatever order it reads the topics in.
    state = read_state(kafka)
    (rebuilt,) = state.sweeps.values()
    assert rebuilt.finished
    assert rebuilt.outcomes[requests[2].id].id == expired.id


def test_the_timer_declares_every_run_of_a_sweep_without_workers_failed(kafka, group):
    define(kafka, pipeline_text(extra="sweep: {hidden: [16, 32]}\ndeadline_seconds: 1\n"))
    send(kafka, validated("iris", "v1"))
    with running(kafka, group):
        expired = wait_until(
            lambda: (found := _deadline_failures(kafka)) and len(found) == 2 and found,
            "both runs declared failed",
            timeout=60,
        )
    requests = read_events(kafka, "training.requested")
    assert {e.data.request_id for e in expired} == {r.id for r in requests}
    assert all(e.data.error_type == DEADLINE_EXCEEDED for e in expired)
    # No run completed: nothing to promote or reject.
    assert decisions(kafka) == {"model.promoted": [], "model.rejected": []}

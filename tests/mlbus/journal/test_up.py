"""`mlbus up` keeps its log: after a SIGKILL of every one of its processes (the power-cut
case), the next `mlbus up` on the same data dir has every record acknowledged to the CLI at
the same offset and every group's offsets, and its services do not redo their work; a second
`mlbus up` on a data dir in use is refused naming the first."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from mlbus.journal.format import segments
from mlbus.kafka.config import KafkaConfig
from tests.mlbus.journal.test_restore import everything, journal_of
from tests.mlbus.test_broker import pid_alive, wait_gone
from tests.mlbus.test_cli import (
    Up,
    clean_env,
    dataset,
    ids_in,
    mlbus,
    ok,
    one_line_error,
    start_up,
)

pytestmark = pytest.mark.integration

__all__ = ["start_up"]  # the fixture, used by name
GROUP = "mlbus-validator"


def offsets(bootstrap: str) -> dict[tuple[str, int], int]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    request = [ConsumerGroupTopicPartitions(GROUP)]
    result = admin.list_consumer_group_offsets(request)[GROUP].result(timeout=10)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f}s")
        time.sleep(0.1)


def kill_everything(up: Up) -> None:
    """SIGKILL `mlbus up`, its broker and its services at once: nothing gets to clean up."""
    services = json.loads((up.data_dir / "services.json").read_text())["services"]
    pids = [up.proc.pid, up.broker_pid, *(s["pid"] for s in services if s["pid"])]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    up.proc.wait(10)
    for pid in pids[1:]:
        wait_gone(pid, what=f"process {pid}")


def test_up_after_a_sigkill_of_every_process_restores_the_log_and_redoes_nothing(
    start_up: Any, tmp_path: Path
) -> None:
    first = start_up()
    state = first.wait_up()
    kafka = KafkaConfig(bootstrap=state["bootstrap"], embedded=True)
    journal = first.data_dir / "journal"
    for n, name in enumerate(("iris", "digits", "wine"), 1):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dataset(name)))
        ids_in(ok(mlbus("publish", "dataset.created", "-d", str(path), env=first.env)).stdout)
        # `mlbus publish` returns once the journal has the record on disk.
        durable = json.loads((journal / "durable.json").read_text())["positions"]
        assert sum(durable["dataset.created"].values()) == n
    wait_for(lambda: sum(offsets(state["bootstrap"]).values()) == 3, "no commit of the validator")

    def snapshot_has_the_commits() -> bool:
        groups = json.loads((journal / "groups.json").read_text())["groups"]
        return sum(groups.get(GROUP, {}).get("dataset.created", {}).values()) == 3

    wait_for(snapshot_has_the_commits, "the journal did not snapshot the validator's offsets")
    before = everything(kafka)
    assert sum(1 for r in before if r[0] == "dataset.created") == 3
    effects = [r for r in before if r[0] in ("dataset.validated", "mlbus.deadletter")]
    assert len(effects) == 3, "the validator answers each dataset once"
    group_before = offsets(state["bootstrap"])
    kill_everything(first)

    second = start_up()
    state = second.wait_up()
    out = " ".join("".join(second.stdout).split())
    assert f"journal: restored {len(before)} records" in out, second.output()
    kafka = KafkaConfig(bootstrap=state["bootstrap"], embedded=True)
    assert offsets(state["bootstrap"]) == group_before
    time.sleep(3)  # the validator has joined its group and would have redone work by now
    assert everything(kafka) == before, "records differ, or the validator validated again"
    assert second.stop(signal.SIGTERM) == 0, second.output()

    verify = ok(mlbus("journal", "verify", env=second.env))
    assert "every frame checks out" in verify.stdout


def test_a_second_up_on_the_same_data_dir_is_refused_naming_the_first(start_up: Any) -> None:
    first = start_up()
    state = first.wait_up()
    second = mlbus("up", env=first.env, timeout=30)
    assert second.returncode == 1
    one_line_error(second, "another `mlbus up` runs on data dir", f"pid {first.proc.pid}")
    assert "embedded broker" not in second.stdout
    assert first.proc.poll() is None and pid_alive(first.broker_pid)
    assert json.loads((first.data_dir / "broker.json").read_text()) == state
    # The lock goes with its process, however it ends.
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    wait_gone(first.broker_pid)
    third = start_up(first.data_dir)
    third.wait_up()
    assert third.stop(signal.SIGTERM) == 0, third.output()


def test_up_restores_what_precedes_a_torn_final_write_and_says_so(
    start_up: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    journal_of(data_dir / "journal", "training.progress", {0: 7000})  # frames of 5000 + 2000
    (segment,) = segments(data_dir / "journal")
    torn = segment.read_bytes()[:-3]
    segment.write_bytes(torn)
    up = start_up(data_dir)
    up.wait_up()
    out = " ".join("".join(up.stdout).split())
    assert "journal: a torn final write in segment-00000001.mlj" in out, up.output()
    assert "journal: restored 5,000 records" in out, up.output()
    assert up.stop(signal.SIGTERM) == 0, up.output()
    assert segment.read_bytes() == torn, "the torn segment is left as it is"


def test_up_refuses_a_newer_journal_in_one_line_and_leaves_it_untouched(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    journal_of(data_dir / "journal", "training.progress", {0: 10})
    (segment,) = segments(data_dir / "journal")
    data = bytearray(segment.read_bytes())
    data[8] = 2  # format version 2
    segment.write_bytes(bytes(data))
    env = clean_env(MLBUS_DATA_DIR=str(data_dir))
    result = mlbus("up", "--only", "validator", env=env, timeout=60)
    one_line_error(result, "format 2 was written by a newer mlbus", "left untouched")
    assert segment.read_bytes() == bytes(data)
    assert sorted(p.name for p in (data_dir / "journal").iterdir()) == [segment.name]
    assert not (data_dir / "broker.json").exists()

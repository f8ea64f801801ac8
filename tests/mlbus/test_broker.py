"""The embedded broker launcher (mlbus/broker.py): start, answer, stop, record its address in
the data dir, and never leave a Tansu process behind, not even when its parent is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mlbus.broker import (
    STATE_FILE,
    EmbeddedBroker,
    answers_metadata,
    resolve_bootstrap,
    running_broker,
)
from mlbus.errors import BrokerError, BrokerNotRunning
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings

# These tests start their own brokers: they are integration tests without the session one.
pytestmark = pytest.mark.integration


# -- helpers (also used by test_cli.py) ----------------------------------------------------


def pid_alive(pid: int, name: str = "tansu") -> bool:
    """True while process `pid` runs and is `name` (a zombie or a reused pid is not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and name.encode() in cmdline


def wait_gone(pid: int, timeout: float = 10.0, what: str = "the broker") -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (pid {pid}) still runs {timeout:.0f}s later")
        time.sleep(0.05)


def kill_if_alive(pid: int | None) -> None:
    """Safety net for failed tests: never leave a broker of ours running."""
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- start / stop ---------------------------------------------------------------------------


def test_start_answers_metadata_and_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path, record=False)
    try:
        bootstrap = broker.start()
        assert broker.process is not None
        pid = broker.process.pid
        assert bootstrap == broker.bootstrap
        assert bootstrap.startswith("127.0.0.1:")
        assert broker.alive()
        assert pid_alive(pid)
        assert answers_metadata(bootstrap)
        assert not (tmp_path / STATE_FILE).exists(), "record=False must not write broker.json"
    finally:
        broker.stop()
    assert not broker.alive()
    wait_gone(pid)
    assert not answers_metadata(bootstrap, timeout=1.0)
    broker.stop()  # a second stop is a no-op


def test_context_manager_stops_the_broker_on_an_exception(tmp_path: Path) -> None:
    pid = None
    with pytest.raises(RuntimeError, match="boom"), EmbeddedBroker(tmp_path) as broker:
        assert broker.process is not None
        pid = broker.process.pid
        assert answers_metadata(broker.bootstrap)
        raise RuntimeError("boom")
    assert pid is not None
    wait_gone(pid)
    assert not (tmp_path / STATE_FILE).exists()


def test_bootstrap_before_start_is_a_broker_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="not been started"):
        _ = EmbeddedBroker(tmp_path).bootstrap


def test_start_failure_raises_and_leaves_no_process(tmp_path: Path) -> None:
    # The port is taken: the broker cannot listen, start() must say so and clean up.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(tmp_path, port=port)
        with pytest.raises(BrokerError):
            broker.start(timeout=10)
    assert broker.process is None
    assert not broker.alive()
    assert not (tmp_path / STATE_FILE).exists()


# -- broker.json: finding the broker of a running `mlbus up` ----------------------------------


def test_running_broker_gives_the_address_while_it_runs_and_none_after(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert running_broker(tmp_path) is None
    broker = EmbeddedBroker(tmp_path)
    try:
        bootstrap = broker.start()
        assert broker.process is not None
        pid = broker.process.pid
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert (state["bootstrap"], state["pid"]) == (bootstrap, pid)
        assert running_broker(tmp_path) == bootstrap
        assert resolve_bootstrap(settings) == (bootstrap, True)
        kafka = KafkaConfig.from_settings(settings)
        assert (kafka.bootstrap, kafka.embedded) == (bootstrap, True)
    finally:
        broker.stop()
    wait_gone(pid)
    assert running_broker(tmp_path) is None
    assert not (tmp_path / STATE_FILE).exists()
    with pytest.raises(BrokerNotRunning, match="mlbus up"):
        resolve_bootstrap(settings)


def test_a_configured_cluster_wins_over_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"bootstrap": "127.0.0.1:1", "pid": os.getpid()}))
    settings = Settings(data_dir=tmp_path, kafka_bootstrap_servers="kafka.example:9092")
    assert resolve_bootstrap(settings) == ("kafka.example:9092", False)


def test_a_second_recording_broker_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path) as first:
        state = (tmp_path / STATE_FILE).read_text()
        second = EmbeddedBroker(tmp_path)
        with pytest.raises(BrokerError, match="already runs"):
            second.start()
        assert second.process is None
        assert first.alive()
        assert (tmp_path / STATE_FILE).read_text() == state
        assert running_broker(tmp_path) == first.bootstrap


def test_a_stale_state_file_with_a_dead_pid_is_not_running(tmp_path: Path) -> None:
    pid = dead_pid()
    (tmp_path / STATE_FILE).write_text(json.dumps({"bootstrap": "127.0.0.1:9", "pid": pid}))
    assert running_broker(tmp_path) is None
    with pytest.raises(BrokerNotRunning, match="mlbus up"):
        resolve_bootstrap(Settings(data_dir=tmp_path))
    # A new broker is not refused because of it, and replaces the record.
    with EmbeddedBroker(tmp_path) as broker:
        assert broker.process is not None
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert (state["bootstrap"], state["pid"]) == (broker.bootstrap, broker.process.pid)
        assert running_broker(tmp_path) == broker.bootstrap
    assert not (tmp_path / STATE_FILE).exists()


def test_a_state_file_naming_a_zombie_is_not_running(tmp_path: Path) -> None:
    # A broker whose parent died is a zombie until init reaps it, and a container's init may
    # never do: it is dead all the same (os.kill(pid, 0) still succeeds on it).
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while _state(child.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.02)
        state = {"bootstrap": "127.0.0.1:9", "pid": child.pid}
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        assert running_broker(tmp_path) is None
    finally:
        child.wait()


def test_a_state_file_naming_a_live_process_that_is_no_broker_is_not_running(
    tmp_path: Path,
) -> None:
    # After a crash or a reboot the recorded pid may belong to an unrelated process.
    state = {"bootstrap": "127.0.0.1:9", "pid": os.getpid()}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert running_broker(tmp_path) is None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        '{"bootstrap": "127.0.0.1:9"}',
        '{"pid": 1}',
        '{"pid": "x", "bootstrap": "a:1"}',
    ],
    ids=["not-json", "empty", "no-pid", "no-bootstrap", "bad-pid"],
)
def test_an_unreadable_state_file_is_not_running(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert running_broker(tmp_path) is None


# -- no orphans -----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlbus.broker import EmbeddedBroker

    broker = EmbeddedBroker(Path(sys.argv[1]), record=False)
    broker.start()
    print(broker.process.pid, broker.bootstrap, flush=True)
    time.sleep(300)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_sigkill_of_the_parent_leaves_no_orphan_broker(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # the child prints as soon as the broker answers
        if not line:
            parent.kill()
            pytest.fail(f"the parent exited before starting a broker: {parent.stderr.read()}")
        pid = int(line.split()[0])
        assert pid_alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_gone(pid, timeout=10, what="the broker of a SIGKILLed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_if_alive(pid)


def test_broker_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
    broker = EmbeddedBroker(tmp_path, record=False)
    starter = threading.Thread(target=broker.start)
    starter.start()
    starter.join(30)
    pid = broker.process.pid if broker.process is not None else None
    try:
        assert pid is not None, "the broker did not start"
        time.sleep(0.5)  # the kernel signals at thread exit; give it a moment to act
        assert broker.alive(), (
            f"the broker exited (code {broker.process.returncode}) when the thread that "
            "started it ended, although its process still runs"
        )
        assert answers_metadata(broker.bootstrap)
    finally:
        broker.stop()
        kill_if_alive(pid)

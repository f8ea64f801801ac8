"""`mlbus up`'s supervisor: one merged log stream, crashed services restarted with backoff
without touching the others, and a stop that SIGKILLs only what ignores SIGTERM."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from mlbus.errors import ConfigError
from mlbus.settings import Settings
from mlbus.supervisor import Process, Supervisor, catalog, read_status, select

STEADY = "import signal, sys, time; print('up', flush=True); time.sleep(600)"
CRASHING = "import sys; print('dying', flush=True); sys.exit(3)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(600)"
)


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, name: str, line: str) -> None:
        with self.lock:
            self.lines.append((name, line))

    def of(self, name: str) -> list[str]:
        with self.lock:
            return [line for n, line in self.lines if n == name]


def supervise(tmp_path, services, **kwargs):
    out = Lines()
    supervisor = Supervisor(
        services, env={}, output=out, data_dir=tmp_path, program=(sys.executable, "-c"), **kwargs
    )
    return supervisor, out


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_crashing_service_is_restarted_and_reported_without_touching_the_others(tmp_path):
    supervisor, out = supervise(
        tmp_path,
        [Process("steady", (STEADY,)), Process("flaky", (CRASHING,))],
        backoff=(0.1, 0.4),
    )
    stop = threading.Event()
    supervisor.start()
    steady_pid = supervisor.status()[0]["pid"]
    watcher = threading.Thread(target=supervisor.watch, args=(stop, 0.02))
    watcher.start()
    try:
        wait_for(lambda: supervisor.status()[1]["restarts"] >= 3)
    finally:
        stop.set()
        watcher.join()
        codes = dict(supervisor.stop())
    assert out.of("steady") == ["up"]
    assert out.of("flaky").count("dying") >= 3
    reports = out.of("mlbus")
    assert "flaky exited with code 3; restarting in 0s" in reports
    assert any(r.startswith("restarted flaky (restart 3)") for r in reports)
    assert supervisor.status()[0]["restarts"] == 0
    assert steady_pid != supervisor.status()[1]["pid"]
    assert codes["steady"] == -15  # stopped by SIGTERM, not killed


def test_stop_kills_only_what_ignores_sigterm(tmp_path):
    supervisor, out = supervise(
        tmp_path, [Process("polite", (STEADY,)), Process("stubborn", (STUBBORN,))], grace=1.0
    )
    supervisor.start()
    wait_for(lambda: out.of("stubborn") == ["up"] and out.of("polite") == ["up"])
    codes = dict(supervisor.stop())
    assert codes == {"polite": -15, "stubborn": None}
    assert "stubborn did not stop within 1s: killed" in out.of("mlbus")
    assert [s["state"] for s in supervisor.status()] == ["stopped", "stopped"]


def test_status_file_names_every_service_while_the_supervisor_lives(tmp_path):
    supervisor, _ = supervise(tmp_path, [Process("a", (STEADY,), url="http://x")])
    supervisor.start()
    try:
        status = read_status(tmp_path)
        assert status is not None
        [row] = status["services"]
        assert row["service"] == "a" and row["url"] == "http://x" and row["pid"]
    finally:
        supervisor.stop()


def test_select_picks_services_by_name_and_every_trainer_by_kind(tmp_path):
    services = catalog(Settings(data_dir=tmp_path), trainers=2)
    assert [s.name for s in select(services, "serve,trainer")] == [
        "trainer-1",
        "trainer-2",
        "serve",
    ]
    assert [s.name for s in select(services, None)] == [s.name for s in services]
    with pytest.raises(ConfigError, match="unknown service 'servr'"):
        select(services, "servr")


def test_several_trainers_each_train_on_their_share_of_the_cores_unless_set(tmp_path):
    from mlbus.runtime import usable_cores

    def trainers(services):
        return [dict(s.env) for s in services if s.name.startswith("trainer")]

    share = str(max(1, usable_cores() // 2))
    cfg = Settings(data_dir=tmp_path)
    assert trainers(catalog(cfg, trainers=2)) == [{"MLBUS_TRAINER__TORCH_THREADS": share}] * 2
    assert trainers(catalog(cfg, trainers=1)) == [{}]  # alone: torch's default
    assert all(not s.env for s in catalog(cfg, trainers=2) if not s.name.startswith("trainer"))
    mine = Settings(data_dir=tmp_path, trainer={"torch_threads": 3})
    assert trainers(catalog(mine, trainers=2)) == [{}, {}]  # the user's setting stands


def test_a_process_gets_its_own_settings_over_the_supervisors(tmp_path):
    show = (
        "import os, time; print('threads', os.environ.get('X_THREADS'), flush=True); "
        "time.sleep(600)"
    )
    supervisor, out = supervise(
        tmp_path, [Process("own", (show,), env=(("X_THREADS", "1"),)), Process("plain", (show,))]
    )
    supervisor.start()
    try:
        wait_for(lambda: out.of("own") and out.of("plain"))
    finally:
        supervisor.stop()
    assert out.of("own") == ["threads 1"] and out.of("plain") == ["threads None"]

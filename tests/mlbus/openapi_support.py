"""Runs schemathesis (its command line, every check) against a running server's OpenAPI
document, for the tests of both APIs: a failure of any check fails the test, with
schemathesis's report as the message."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from tests.mlbus.kafka.support import wait_until


def schemathesis(
    url: str,
    tmp_path: Path,
    *,
    token: str | None = None,
    max_examples: int = 10,
    config: str = "",
) -> None:
    """Run every check of schemathesis against `url`'s /openapi.json, sending `token`
    (ignored_auth then checks that the secured operations refuse requests without it).
    `config` is added to its configuration file. Fails with the report on any failure."""
    path = tmp_path / "schemathesis.toml"
    path.write_text(config)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(path),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(max_examples),
        "--seed",
        "1",
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    tested = re.search(r"Tested:\s+(\d+)", done.stdout)
    assert tested is not None and int(tested[1]) > 0, done.stdout[-5000:]


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free port: its base URL; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-openapi", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"

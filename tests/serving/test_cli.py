"""`mlbus serve` as a process: serves the champion found in the log, and exits 0 on
SIGTERM (graceful uvicorn shutdown, log reader and producers closed)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import wait_until
from tests.mlbus.test_cli import MLBUS, env  # noqa: F401 - env is a fixture
from tests.serving.conftest import body, free_port, promote, save

FAST = {  # the embedded broker's settings (a configured bootstrap keeps Kafka's defaults)
    "MLBUS_KAFKA__FETCH_WAIT_MAX_MS": "10",
    "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
    "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
}


def test_serve_answers_and_exits_0_on_sigterm(env, kafka, digits):  # noqa: F811
    store = ObjectStore((Path(env["MLBUS_DATA_DIR"]) / "objects").resolve().as_uri())
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    port = free_port()
    process = subprocess.Popen(
        [MLBUS, "serve", "--port", str(port)],
        env=env | FAST | {"MLBUS_API_TOKEN": "t"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None  # died: fail below with its output

        wait_until(ready, "mlbus serve to be ready", timeout=60)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        r = httpx.post(f"{url}/v2/models/digits/infer", json=body(digits.x[:2]))
        assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
        assert httpx.post(f"{url}/v2/repository/index").status_code == 401  # MLBUS_API_TOKEN
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

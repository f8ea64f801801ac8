"""The control plane cannot be exhausted through its edge: a large body is refused before it
is read (without the token: 401 before a byte is buffered; with it: 413 once past
`api.max_body_bytes`), measured as the peak memory of a real `mlbus api` process; and the
bombs of user input (an alias-laden pipeline, a NUL byte in a URI) are 400s that name the
problem, not a stalled or failed server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings
from tests.consumers.workflow.test_definitions import LAUGHS
from tests.mlbus.kafka.support import read_events
from tests.mlbus.storage_support import REPO

TOKEN = "s3cret"
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert found, status
    return int(found.group(1)) * 1024


class Api:
    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process, self.url = process, url


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """`mlbus api` as its own process on a free loopback port, with a token. Its broker is a
    closed port: nothing these tests send may get as far as Kafka."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_API_TOKEN=TOKEN,
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{_free_port()}",
    )
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlbus", "api", "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlbus api exited {process.returncode}: {_tail(tmp_path)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlbus api did not answer /health: {_tail(tmp_path)}")
            time.sleep(0.2)
        yield Api(process, url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # uvicorn's clean shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "api.log").read_text(errors="replace")[-3000:]


def stream(megabytes: int) -> Iterator[bytes]:
    """A chunked body of `megabytes` MiB that this test never holds whole."""
    chunk = b" " * MiB
    for _ in range(megabytes):
        yield chunk


def test_a_200_mb_post_is_refused_before_it_is_read(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=120) as client:
        # The paths a refusal takes, warmed with small requests: what follows measures bodies.
        assert client.post("/training/requests", json={}).status_code == 401
        warm = client.post(
            "/training/requests", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert warm.status_code == 422, warm.text
        before = peak_rss(api.process.pid)

        refused = client.post(
            "/training/requests", content=stream(200), headers={"content-type": "application/json"}
        )
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "Unauthorized"
        unauthenticated = peak_rss(api.process.pid) - before

        too_large = client.post(
            "/training/requests",
            content=stream(200),
            headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        assert too_large.status_code == 413, too_large.text
        assert too_large.json()["error"] == {
            "type": "PayloadTooLarge",
            "message": f"request body exceeds {4 * MiB} bytes",
        }
        authenticated = peak_rss(api.process.pid) - before
        assert client.get("/health").status_code == 200  # and it still answers

    assert unauthenticated < 20 * MiB, f"peak RSS grew {unauthenticated / MiB:.1f} MiB"
    assert authenticated < 20 * MiB, f"peak RSS grew {authenticated / MiB:.1f} MiB"


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=f"127.0.0.1:{_free_port()}",
        api_token=TOKEN,
    )
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"})


def test_an_alias_bomb_pipeline_is_a_400_naming_the_alias(client: TestClient) -> None:
    """Refused while parsing, before the log is asked for the current revision (the broker
    here is a closed port)."""
    response = client.post("/pipelines", content=LAUGHS, headers={"content-type": "text/yaml"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "type": "InvalidPipeline",
        "message": "request body line 2: YAML aliases (*a) are not allowed in a pipeline file: "
        "write the value out",
    }


def test_a_nul_byte_in_a_request_path_is_a_400(client: TestClient) -> None:
    response = client.get("/datasets/digits%00/abc")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "InvalidPath"


def test_a_nul_byte_in_a_dataset_uri_is_a_400(
    kafka: KafkaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=kafka.bootstrap,
        topic_prefix=kafka.topic_prefix,
        kafka={"fetch.wait.max.ms": "10"},
    )
    (tmp_path / "data.csv").write_text("x,label\n1,0\n2,1\n")
    with TestClient(create_app(settings)) as client:
        response = client.post("/datasets", json={"uri": "data.csv\x00.txt", "name": "d"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "type": "InvalidPath",
        "message": "URI 'data.csv\\x00.txt' contains a NUL byte (\\x00)",
    }
    assert read_events(kafka, "dataset.created") == []


def test_a_pipeline_with_a_character_yaml_refuses_is_a_400(client: TestClient) -> None:
    """YAML's reader refuses control characters before parsing: a 400, not a 500."""
    response = client.post("/pipelines", json={"definition": "\x82p"})
    assert response.status_code == 400, response.text
    assert "not valid YAML" in response.json()["error"]["message"]

"""Path traversal through the control-plane API: dataset URIs and names, and the path
parameters of every route that takes one, with `../`, absolute paths, percent-encoded dots
and slashes, backslashes and NUL bytes. Each attempt is a 4xx with an error body, never a
500, never the content of a file outside the allowed roots, and registers or publishes
nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings
from tests.mlbus.kafka.support import read_raw

pytestmark = pytest.mark.integration

SECRET = "TOP-SECRET-OUTSIDE-THE-ROOTS"

#: (what, dataset URI) registered as `POST /datasets {"uri": ..., "name": "d"}` from a working
#: directory (`inbox`, an allowed root) whose parent holds `secret.csv`.
URIS = [
    ("relative ../", "../secret.csv"),
    ("deep relative ../", "../../../../../../../../etc/passwd"),
    ("../ inside the root", "{inbox}/../secret.csv"),
    ("file:// with ../", "file://{inbox}/../secret.csv"),
    ("absolute path", "/etc/passwd"),
    ("absolute file://", "file:///etc/passwd"),
    ("a sibling of the root", "{inbox}-evil/data.csv"),
    ("percent-encoded dots", "%2e%2e/secret.csv"),
    ("percent-encoded file://", "file://{inbox}/%2e%2e/secret.csv"),
    ("percent-encoded slash", "..%2fsecret.csv"),
    ("double-encoded dots", "%252e%252e/secret.csv"),
    ("backslashes", "..\\secret.csv"),
    ("NUL byte", "data.csv\x00../secret.csv"),
    ("another bucket", "s3://someone-elses-bucket/data.parquet"),
    ("http", "http://127.0.0.1:1/secret.csv"),
]

#: (what, method, path) of routes with path parameters.
PATHS = [
    ("dataset name ../", "GET", "/datasets/..%2F..%2Fsecret/1"),
    ("dataset dots", "GET", "/datasets/%2e%2e/%2e%2e"),
    ("dataset absolute", "GET", "/datasets/%2Fetc%2Fpasswd/1"),
    ("dataset NUL", "GET", "/datasets/d%00/1"),
    ("lineage upstream", "GET", "/lineage/models/..%2F..%2Fetc%2Fpasswd/upstream"),
    ("lineage history", "GET", "/lineage/models/%2e%2e/history"),
    ("lineage why", "GET", "/lineage/models/m/versions/..%2F..%2Fsecret/why"),
    ("lineage downstream", "GET", "/lineage/datasets/..%5C..%5Csecret/downstream"),
    ("lineage NUL", "GET", "/lineage/models/m%00x/serving"),
    ("ui graph", "GET", "/ui/lineage/..%2F..%2Fetc%2Fpasswd.svg"),
    ("ui page", "GET", "/ui/lineage/%2e%2e%2f%2e%2e%2fsecret"),
    ("promote", "POST", "/models/..%2F..%2Fescape/promote"),
    ("rollback", "POST", "/models/%2Fetc%2Fpasswd/rollback"),
]


@pytest.fixture
def client(
    kafka: KafkaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "data.csv").write_text("x,label\n1,0\n2,1\n")
    (tmp_path / "secret.csv").write_text(f"x,label\n{SECRET},1\n")
    (tmp_path / "inbox-evil").mkdir()
    (tmp_path / "inbox-evil" / "data.csv").write_text(f"x,label\n{SECRET},1\n")
    monkeypatch.chdir(inbox)  # the default allowed roots: the working directory, data_dir
    settings = Settings(
        data_dir=inbox / ".mlbus",
        kafka_bootstrap_servers=kafka.bootstrap,
        topic_prefix=kafka.topic_prefix,
        kafka={"fetch.wait.max.ms": "10"},
    )
    with TestClient(create_app(settings)) as c:
        yield c


def refused(response, what: str, *, lookup: bool = False) -> None:
    """A 4xx with an error body; a `lookup` (a read of the SQL store by name) may instead
    answer 200 with nothing: there is nothing by that name, and no file is involved."""
    assert SECRET not in response.text and "root:" not in response.text, what
    if lookup and response.status_code == 200:
        assert response.json() in ([], {}, None), (what, response.text[:300])
        return
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
    assert response.json()["error"]["message"], (what, response.text[:300])


def test_every_traversal_attempt_is_refused_with_a_4xx(
    client: TestClient, kafka: KafkaConfig, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    for what, uri in URIS:
        response = client.post("/datasets", json={"uri": uri.format(inbox=inbox), "name": "d"})
        refused(response, what)
    for what, name in [("name ../", "../../escape"), ("name absolute", "/etc/d")]:
        refused(client.post("/datasets", json={"uri": "data.csv", "name": name}), what)
    for what, method, path in PATHS:
        body = {"version": "1", "reason": "probe"} if method == "POST" else None
        refused(client.request(method, path, json=body), what, lookup=method == "GET")
    assert len(URIS) + 2 + len(PATHS) >= 24  # as many as the probe tried
    # Nothing was registered or decided, and the file outside the roots was never copied.
    for topic in ("dataset.created", "model.promoted", "training.requested"):
        assert read_raw(kafka, kafka.topic(topic)) == [], topic
    stored = [p for p in (inbox / ".mlbus").rglob("*") if p.is_file()]
    assert not [p for p in stored if SECRET.encode() in p.read_bytes()]

    # The same client registers a file inside the root: the refusals were not an outage.
    ok = client.post("/datasets", json={"uri": "data.csv", "name": "d"})
    assert ok.status_code == 201, ok.text

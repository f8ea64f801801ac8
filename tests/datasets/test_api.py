"""The dataset routes of the control-plane HTTP API (create_app), against the real broker and
the local object store: uploads and URIs in, dataset.created out; every failure one JSON
error body {"error": {"type", "message"}} with the right status."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings
from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import read_events
from tests.mlbus.storage_support import everything, staging_leftovers


def csv_bytes(rows: int = 30, offset: int = 0) -> bytes:
    data = pa.table(
        {"x": [i * 0.5 + offset for i in range(rows)], "label": [i % 3 for i in range(rows)]}
    )
    sink = io.BytesIO()
    pcsv.write_csv(data, sink)
    return sink.getvalue()


@pytest.fixture
def settings(kafka: KafkaConfig, tmp_path: Path) -> Settings:
    (tmp_path / "inbox").mkdir()
    return Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=kafka.bootstrap,
        topic_prefix=kafka.topic_prefix,
        allowed_roots=[str(tmp_path / "inbox")],
        # A configured cluster keeps Kafka's defaults; a quick answer from the test broker:
        kafka={"fetch.wait.max.ms": "10"},
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:  # the app's lifespan closes its registry
        yield client


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(settings)


def upload(client: TestClient, content: bytes, filename: str = "train.csv", **fields: str) -> Any:
    return client.post(
        "/datasets", files={"file": (filename, content, "application/octet-stream")}, data=fields
    )


def error_of(response: Any, status: int, kind: str, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    return body["error"]["message"]


def test_an_upload_is_registered_once(
    client: TestClient, kafka: KafkaConfig, store: ObjectStore
) -> None:
    content = csv_bytes()
    first = upload(client, content, name="train", label="label", tags="team=ml,stage=raw")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["created"] is True and body["name"] == "train" and body["num_rows"] == 30
    assert body["content_hash"] == "sha256:" + body["version"]
    assert body["uri"] == store.uri(f"datasets/train/{body['version']}/data.parquet")

    again = upload(client, content, filename="same-bytes.csv", name="train")
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert (again.json()["version"], again.json()["event_id"]) == (
        body["version"],
        body["event_id"],
    )

    (event,) = read_events(kafka, "dataset.created")
    assert event.id == body["event_id"]
    assert event.data.tags == {"team": "ml", "stage": "raw"}
    assert event.data.label_column == "label"
    assert event.data.created_by == "http"
    assert staging_leftovers(store) == []


def test_a_parquet_upload_with_parents(client: TestClient, kafka: KafkaConfig) -> None:
    raw = upload(client, csv_bytes(), name="raw").json()
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1.0, 2.0]}), sink)
    derived = upload(
        client,
        sink.getvalue(),
        filename="clean.parquet",
        name="clean",
        parents=f"raw@{raw['version'][:12]}",
        description="cleaned",
    )
    assert derived.status_code == 201, derived.text
    event = next(e for e in read_events(kafka, "dataset.created") if e.data.name == "clean")
    assert [(p.name, p.version) for p in event.data.parents] == [("raw", raw["version"])]
    assert event.data.description == "cleaned"


def test_a_uri_is_registered(client: TestClient, settings: Settings, kafka: KafkaConfig) -> None:
    path = Path(settings.allowed_roots[0]) / "train.csv"
    path.write_bytes(csv_bytes())
    response = client.post("/datasets", json={"uri": path.as_uri(), "name": "from-uri"})
    assert response.status_code == 201, response.text
    assert response.json()["num_rows"] == 30
    again = client.post("/datasets", json={"uri": str(path), "name": "from-uri"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert [e.data.name for e in read_events(kafka, "dataset.created")] == ["from-uri"]


def test_listing_and_showing_versions(client: TestClient) -> None:
    assert client.get("/datasets").json() == []
    v1 = upload(client, csv_bytes(offset=0), name="train").json()
    v2 = upload(client, csv_bytes(offset=1), name="train").json()
    other = upload(client, csv_bytes(offset=2), name="test").json()

    listed = client.get("/datasets")
    assert listed.status_code == 200
    rows = listed.json()
    assert [(r["name"], r["version"]) for r in rows] == [
        ("train", v1["version"]),
        ("train", v2["version"]),
        ("test", other["version"]),
    ]
    assert {r["event_id"] for r in rows} == {v1["event_id"], v2["event_id"], other["event_id"]}
    assert all("columns" not in r for r in rows)  # the summary leaves the statistics out

    shown = client.get(f"/datasets/train/{v1['version'][:10]}")
    assert shown.status_code == 200, shown.text
    event = shown.json()
    assert event["id"] == v1["event_id"] and event["type"] == "dataset.created"
    assert event["data"]["version"] == v1["version"]
    assert event["data"]["columns"]["x"]["kind"] == "numeric"
    full = client.get(f"/datasets/train/sha256:{v2['version']}")
    assert full.status_code == 200 and full.json()["id"] == v2["event_id"]


def test_unknown_datasets_are_404(client: TestClient) -> None:
    error_of(client.get("/datasets/ghost/abc123"), 404, "UnknownDataset", "ghost")
    upload(client, csv_bytes(), name="train")
    error_of(client.get("/datasets/train/ffff0000"), 404, "UnknownDataset", "ffff0000")


def test_bad_requests_are_400_and_register_nothing(
    client: TestClient, settings: Settings, kafka: KafkaConfig, store: ObjectStore, tmp_path
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_bytes(csv_bytes())
    cases = [
        (
            client.post("/datasets", json={"uri": "file:///etc/passwd", "name": "x"}),
            "StorageError",
            ["/etc/passwd", "outside"],
        ),
        (
            client.post("/datasets", json={"uri": "../../etc/passwd", "name": "x"}),
            "StorageError",
            ["outside"],
        ),
        (
            client.post("/datasets", json={"uri": outside.as_uri(), "name": "x"}),
            "StorageError",
            ["outside"],
        ),
        (upload(client, b"", name="empty"), "InvalidDataset", ["empty"]),
        (upload(client, b"a,b\n1,2\n2,two\n", name="mixed"), "InvalidDataset", ["'b'", "mixed"]),
        (
            upload(client, b"not parquet", filename="d.parquet", name="x"),
            "InvalidDataset",
            ["not a Parquet file"],
        ),
        (upload(client, b"{}", filename="d.json", name="x"), "InvalidDataset", ["format"]),
        (upload(client, csv_bytes()), "InvalidDataset", ["'name' is required"]),
        (upload(client, csv_bytes(), name="bad name"), "InvalidDataset", ["dataset name"]),
        (upload(client, csv_bytes(), name="x", label="target"), "InvalidDataset", ["target"]),
        (upload(client, csv_bytes(), name="x", tags="novalue"), "InvalidDataset", ["novalue"]),
        (upload(client, csv_bytes(), name="x", parents="ghost@abc"), "UnknownDataset", ["ghost"]),
        (
            client.post("/datasets", content=b"rows=3", headers={"content-type": "text/plain"}),
            "InvalidDataset",
            ["neither multipart nor JSON"],
        ),
        (client.post("/datasets", json={"name": "x"}), "InvalidDataset", ["'uri'"]),
    ]
    for response, kind, fragments in cases:
        status = 404 if kind == "UnknownDataset" else 400
        error_of(response, status, kind, *fragments)
    assert read_events(kafka, "dataset.created") == []
    assert everything(store) == []


def test_the_openapi_document_lists_the_routes(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    assert set(paths["/datasets"]) == {"get", "post"}
    assert set(paths["/datasets/{name}/{version}"]) == {"get"}
    assert "/health" in paths
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "filename, content",
    [
        ("arrays.npz", b"PK\x03\x04 a zip archive cut short"),
        ("ids.csv", b"id\n1763700000123456789\n1763700001987654321\n"),  # int64 past 2**53
    ],
    ids=["broken-npz", "large-integers"],
)
def test_an_upload_never_gets_a_bare_500(settings: Settings, filename: str, content: bytes) -> None:
    """Whatever the bytes, the answer is a registration (201) or the JSON error body naming
    the problem (4xx) — never an unhandled exception."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = upload(client, content, filename=filename, name="upload")
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error_of(response, 400, "InvalidDataset", filename)

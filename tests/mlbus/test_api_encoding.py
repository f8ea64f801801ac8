"""The control plane takes gzip and deflate request bodies (`Content-Encoding`), as the model
server does: served by uvicorn and driven by httpx, a compressed training request and a
compressed dataset upload (multipart, inflated as it arrives) do what their plain forms do; a
zip bomb is a 413 at the body limit, a corrupt body a 400 and another coding a 415, with
nothing published."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlbus.cli.control_plane import create_app
from mlbus.kafka.config import KafkaConfig
from tests.datasets.test_api import csv_bytes
from tests.mlbus.kafka.support import read_events
from tests.mlbus.openapi_support import served
from tests.mlbus.test_api import FULL, REQUEST, announce_dataset, settings_for

LIMIT = 64 * 1024  # api.max_body_bytes here


@pytest.fixture
def api(kafka: KafkaConfig, tmp_path: Path) -> Iterator[httpx.Client]:
    settings = settings_for(kafka, tmp_path, api={"max_body_bytes": LIMIT})
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def json_bytes(value: object) -> bytes:
    return httpx.Request("POST", "/", json=value).content


def test_gzip_and_deflate_training_requests_become_events(
    api: httpx.Client, kafka: KafkaConfig
) -> None:
    announce_dataset(kafka)
    body = json_bytes(REQUEST)
    ids = []
    for encoding, content in [("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))]:
        response = api.post(
            "/training/requests",
            content=content,
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
        assert response.status_code == 202, (encoding, response.text)
        ids.append(response.json()["event_id"])
    events = read_events(kafka, "training.requested")
    assert [e.id for e in events] == ids
    assert all(e.data.dataset.version == FULL for e in events)


def test_a_gzip_upload_is_inflated_as_it_arrives_and_registered(
    api: httpx.Client, kafka: KafkaConfig
) -> None:
    """A whole multipart body, gzip-compressed: its inflated size is under the upload limit
    (api.max_upload_bytes), not the JSON body's."""
    content = csv_bytes(rows=10_000)  # inflates beyond LIMIT: counted against the upload limit
    assert len(content) > LIMIT
    request = api.build_request(
        "POST",
        "/datasets",
        files={"file": ("train.csv", content, "application/octet-stream")},
        data={"name": "zipped", "label": "label"},
    )
    multipart = request.read()
    response = api.post(
        "/datasets",
        content=gzip.compress(multipart),
        headers={"content-type": request.headers["content-type"], "content-encoding": "gzip"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["num_rows"] == 10_000
    [event] = read_events(kafka, "dataset.created")
    assert event.data.name == "zipped" and event.id == response.json()["event_id"]


def test_a_zip_bomb_is_a_413_at_the_body_limit(api: httpx.Client, kafka: KafkaConfig) -> None:
    bomb = gzip.compress(b" " * (64 * 1024 * 1024), compresslevel=9)  # ~64 kB -> 64 MB
    response = api.post(
        "/training/requests",
        content=bomb[: LIMIT - 1],  # under the limit as sent: refused on what it inflates to
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == {
        "type": "PayloadTooLarge",
        "message": f"request body inflates to more than {LIMIT} bytes",
    }
    assert api.get("/health").status_code == 200
    assert read_events(kafka, "training.requested") == []


@pytest.mark.parametrize(
    ("content", "encoding", "status", "kind", "fragment"),
    [
        (b'{"model": "m"}', "gzip", 400, "UndecodableBody", "not valid gzip"),
        (gzip.compress(b'{"model": "m"}' * 50)[:-12], "gzip", 400, "UndecodableBody", "truncated"),
        (b'{"model": "m"}', "br", 415, "UnsupportedEncoding", "'br' is not supported"),
    ],
    ids=["not gzip", "truncated", "br"],
)
def test_a_body_that_does_not_inflate_is_refused_naming_why(
    api: httpx.Client,
    kafka: KafkaConfig,
    content: bytes,
    encoding: str,
    status: int,
    kind: str,
    fragment: str,
) -> None:
    response = api.post(
        "/training/requests",
        content=content,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and fragment in error["message"], error
    assert read_events(kafka, "training.requested") == []


def test_the_openapi_document_declares_the_refusals_of_an_encoded_body(api: httpx.Client) -> None:
    operation = api.get("/openapi.json").json()["paths"]["/training/requests"]["post"]
    assert {"400", "413", "415"} <= set(operation["responses"])

"""The control plane's read-only page: models with their serving version, the newest events
(from the lineage store, not by re-reading the log), and lineage pictures as SVG."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.consumers.lineage import tables
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.reader import read_log
from mlbus.settings import Settings
from tests.consumers.lineage.generator import generate_log, produce


def test_ui_shows_models_recent_events_and_lineage_pictures(kafka, tmp_path):
    produce(kafka, generate_log(400, seed=5))
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    store = LineageStore.open(url)
    Projector(store).project(read_log(kafka, TOPICS))
    e = tables.events
    with store.reading() as conn:
        newest = conn.execute(
            sa.select(e.c.id, e.c.key)
            .where(e.c.type == "model.promoted")
            .order_by(e.c.time.desc())
            .limit(1)
        ).one()
    model = newest.key
    serving = LineageQueries(store).serving(model)
    assert serving is not None
    client = TestClient(
        create_app(
            Settings(
                data_dir=tmp_path / "data",
                kafka_bootstrap_servers=kafka.bootstrap,
                topic_prefix=kafka.topic_prefix,
                metadata_url=url,
                kafka={"fetch.wait.max.ms": "10"},
            )
        )
    )

    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert newest.id in page.text  # the newest promotion is among the recent events
    assert f"<a href='/ui/models/{model}'>{model}</a>" in page.text  # its model page
    assert f"<a href='/ui/lineage/{model}'>lineage</a>" in page.text

    picture = client.get(f"/ui/lineage/{model}.svg")
    assert picture.status_code == 200, picture.text
    assert picture.headers["content-type"] == "image/svg+xml"
    assert picture.text.startswith("<svg") and f"lineage of {model}@{serving}" in picture.text
    assert "<svg" in client.get(f"/ui/lineage/{model}").text
    unknown = client.get("/ui/lineage/no-such-model.svg")
    assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]["message"]
    store.close()

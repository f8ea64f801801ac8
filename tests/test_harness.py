"""The real parts the suite depends on are there and answer."""

from __future__ import annotations

import sqlalchemy as sa

from mlbus.broker import answers_metadata
from mlbus.kafka.admin import list_topics
from mlbus.schemas.catalog import CATALOG


def test_broker_answers_and_topics_exist(kafka):
    assert answers_metadata(kafka.bootstrap)
    statuses, _ = list_topics(kafka)
    assert [s.status for s in statuses] == ["ok"] * len(CATALOG)
    assert all(s.topic.startswith(kafka.topic_prefix) for s in statuses)


def test_s3_server_stores_objects(s3):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3["key"],
        secret=s3["secret"],
        client_kwargs={"endpoint_url": s3["endpoint_url"], "region_name": s3["region"]},
    )
    fs.mkdir("harness-bucket", region_name=s3["region"])
    fs.pipe("harness-bucket/a/b.txt", b"hello")
    assert fs.cat("harness-bucket/a/b.txt") == b"hello"


def test_sql_backend_round_trip(sql_url):
    engine = sa.create_engine(sql_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id VARCHAR(40) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t VALUES ('x')"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM t")).scalar_one() == "x"
    engine.dispose()

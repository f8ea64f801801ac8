"""The upstream answer over dataset ancestries of every shape (shared ancestors, a published
cycle, a chain deeper than MAX_DEPTH, parents nobody announced, re-announcements), on both
backends, checked against the plain recursive reading of the rows; and its errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.entities import DatasetNode
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.queries import MAX_DEPTH, LineageQueries
from mlbus.consumers.lineage.store import LineageStore, NotInLineage, micros
from mlbus.errors import MlbusError
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.datasets import DatasetCreated
from mlbus.schemas.training import TrainingCompleted

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHA = "sha256:" + "ab" * 32


def _dataset(name: str, parents: list[str], rows: int = 10) -> DatasetCreated:
    return DatasetCreated.model_validate(
        {
            "name": name,
            "version": "v1",
            "uri": f"s3://b/{name}",
            "content_hash": SHA,
            "arrow_schema": [{"name": "x", "type": "double"}],
            "num_rows": rows,
            "num_bytes": 100,
            "parents": [{"name": p, "version": "v1"} for p in parents],
            "created_by": "etl",
            "tags": {"name": name},
        }
    )


def _model(version: str, dataset: str) -> TrainingCompleted:
    return TrainingCompleted.model_validate(
        {
            "run_id": f"run-{version}",
            "model": "m",
            "version": version,
            "request_id": f"req-{version}",
            "family": "mlp",
            "dataset": {"name": dataset, "version": "v1"},
            "artifact": {"uri": f"file:///{version}", "sha256": SHA},
            "metrics": {},
            "hyperparameters": {},
            "epochs": 1,
            "code": {"package_version": "0.1.0"},
            "duration_seconds": 1.0,
        }
    )


CHAIN = MAX_DEPTH + 5

HISTORY: list[Payload] = [
    # a diamond under a second diamond: shared ancestors appear once per path
    _dataset("base", []),
    _dataset("left", ["base"]),
    _dataset("right", ["base", "ghost"]),  # ghost: never announced
    _dataset("join", ["left", "right"]),
    _dataset("top", ["join", "left", "right"]),
    _model("diamond", "top"),
    # a cycle someone published
    _dataset("p", ["q"]),
    _dataset("q", ["p"]),
    _dataset("r", ["p", "q"]),
    _model("cycle", "r"),
    # a chain deeper than MAX_DEPTH
    *[_dataset(f"c{i}", [f"c{i + 1}"]) for i in range(CHAIN)],
    _dataset(f"c{CHAIN}", []),
    _model("deep", "c0"),
    # announced twice: the first announcement counts
    _dataset("twice", [], rows=1),
    _dataset("twice", ["base"], rows=2),
    _model("twice", "twice"),
]


@pytest.fixture
def queries(store: LineageStore) -> LineageQueries:
    records = []
    for i, payload in enumerate(HISTORY):
        ref, value = encode_new(payload, source="test", time=T0 + timedelta(minutes=i))
        records.append(
            LogRecord(
                ref.type, 0, i, None, (ref.key or "").encode(), tuple(STRUCTURED_HEADERS), value
            )
        )
    Projector(store).project(records[::-1], batch_size=7)  # parents arrive after children
    return LineageQueries(store)


def _reference(store: LineageStore, name: str, cut: int | None = None) -> DatasetNode:
    """The ancestry read one node at a time, straight from the rows: what upstream answers."""
    v = t.dataset_versions

    def node(name: str, depth: int, path: frozenset[str]) -> DatasetNode:
        query = sa.select(v).where(v.c.name == name, v.c.version == "v1")
        if cut is not None:
            query = query.where(v.c.time <= cut)
        with store.reading() as conn:
            row = conn.execute(query.order_by(v.c.time, v.c.event_id).limit(1)).first()
        if row is None:
            return DatasetNode(name=name, version="v1", known=False)
        parents, truncated = [], False
        for parent, _ in row.parents if isinstance(row.parents, list) else []:
            if depth >= MAX_DEPTH or parent in path:
                truncated = True
                continue
            parents.append(node(parent, depth + 1, path | {name}))
        return DatasetNode(
            name=name,
            version="v1",
            known=True,
            uri=row.uri,
            content_hash=row.content_hash,
            num_rows=row.num_rows,
            created_by=row.created_by,
            tags=row.tags,
            parents=parents,
            truncated=truncated,
            provenance=None,
        )

    return node(name, 0, frozenset())


def _shape(node: DatasetNode) -> tuple:
    """A node without its provenance (the reference does not build it)."""
    return (
        node.name,
        node.known,
        node.num_rows,
        node.tags,
        node.truncated,
        [_shape(p) for p in node.parents],
    )


def _names(node: DatasetNode) -> list[str]:
    return [node.name, *(n for p in node.parents for n in _names(p))]


SHAPES = [("diamond", "top"), ("cycle", "r"), ("deep", "c0"), ("twice", "twice")]


@pytest.mark.parametrize(("version", "dataset"), SHAPES)
def test_ancestry_equals_the_node_by_node_reading(
    queries: LineageQueries, version: str, dataset: str
) -> None:
    up = queries.upstream("m", version)
    assert len(up.datasets) == 1
    assert _shape(up.datasets[0]) == _shape(_reference(queries.store, dataset))
    assert all(n.provenance is not None for n in _walk(up.datasets[0]) if n.known)


def _walk(node: DatasetNode) -> list[DatasetNode]:
    return [node, *(n for p in node.parents for n in _walk(p))]


def test_ancestry_shapes_by_hand(queries: LineageQueries) -> None:
    top = queries.upstream("m", "diamond").datasets[0]
    assert _names(top) == [
        "top",
        "join",
        "left",
        "base",
        "right",
        "base",
        "ghost",
        "left",
        "base",
        "right",
        "base",
        "ghost",
    ]
    assert [n.known for n in _walk(top) if n.name == "ghost"] == [False, False]

    r = queries.upstream("m", "cycle").datasets[0]
    assert _names(r) == ["r", "p", "q", "q", "p"]
    assert [n.truncated for n in _walk(r)] == [False, False, True, False, True]

    deep = queries.upstream("m", "deep").datasets[0]
    chain = _walk(deep)
    assert [n.name for n in chain] == [f"c{i}" for i in range(MAX_DEPTH + 1)]
    assert chain[-1].truncated and not any(n.truncated for n in chain[:-1])

    twice = queries.upstream("m", "twice").datasets[0]
    assert twice.num_rows == 1 and twice.parents == []


def test_ancestry_as_known_at_a_time(queries: LineageQueries) -> None:
    # HISTORY[i] happened at minute i: "diamond" (5) after its datasets (0 to 4)
    with pytest.raises(NotInLineage):
        queries.upstream("m", "diamond", as_of=T0 + timedelta(minutes=4))
    cut = T0 + timedelta(minutes=5)
    up = queries.upstream("m", "diamond", as_of=cut)
    assert _shape(up.datasets[0]) == _shape(_reference(queries.store, "top", micros(cut)))
    assert up.datasets[0] == queries.upstream("m", "diamond").datasets[0]


def test_errors_of_the_database_are_lineage_errors(store: LineageStore) -> None:
    with store.transaction() as conn:
        conn.execute(sa.text(f"DROP TABLE {_qualified(store, 'decisions')}"))
    with pytest.raises(MlbusError) as raised:
        LineageQueries(store).upstream("m", "1")
    assert "decisions" in str(raised.value)


def _qualified(store: LineageStore, name: str) -> str:
    return f'"{store.schema}"."{name}"' if store.schema else f'"{name}"'


def test_a_generation_wider_than_one_select_is_read_in_parts(
    queries: LineageQueries, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = queries.upstream("m", "diamond")
    monkeypatch.setattr("mlbus.consumers.lineage.queries.PAIRS_PER_SELECT", 1)
    assert queries.upstream("m", "diamond") == whole

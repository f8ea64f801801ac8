"""The lineage store: where the projection lives (SQLite by default, PostgreSQL for real
deployments), its projection version, the consumer positions, and the canonical dump.

One managed transaction (`LineageStore.transaction`) commits or rolls back in one place and
translates SQLAlchemy's errors; callers get domain objects, never ORM rows. On PostgreSQL
the tables live in their own schema (default `mlbus_lineage`), which is also what a rebuild
swaps; on SQLite a rebuild swaps the database file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from mlbus.consumers.lineage import tables as t
from mlbus.errors import Invalid, MlbusError, NotFound, TransientError
from mlbus.kafka.anchor import Anchor, Position

log = logging.getLogger("mlbus.consumers.lineage")

DEFAULT_PG_SCHEMA = "mlbus_lineage"


class LineageError(MlbusError):
    """The lineage store cannot answer (unknown model, bad argument, store unusable)."""


class NotInLineage(LineageError, NotFound):
    """The model, version or dataset asked about is not in the store."""


class InvalidTime(LineageError, Invalid):
    """An as-of time that is not ISO 8601. 422, as FastAPI answers for a query parameter it
    cannot parse (the other parameters of the lineage routes)."""

    status = 422


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exact (timedelta arithmetic, no float)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH_UTC) // _MICROSECOND


_EPOCH = datetime(1970, 1, 1)


def iso(value: int | None) -> str | None:
    """Microseconds since the epoch as ISO 8601 UTC with microseconds (one fixed width)."""
    if value is None:
        return None
    return (_EPOCH + timedelta(microseconds=value)).isoformat(timespec="microseconds") + "Z"


class LineageStore:
    """A handle on one projection database. `open()` checks the projection version and
    rebuilds (drops) an outdated one; `LineageStore(url)` alone touches nothing.

    `staging=True` (what `staging_for` makes) trades durability for speed: the store is a
    rebuild's scratch copy, thrown away if anything fails, projected without its indexes,
    and indexed and made durable by `swap_in` before it replaces the live one.

    On PostgreSQL a staging store's rows are appended to *heaps* (`heaps`): unlogged tables
    of the same columns without a key, filled by COPY, which `swap_in` moves into the keyed
    tables once, sorted and without duplicates. The key, checked insert by insert, is most
    of the server's cost of an insert keyed by a random event id, and building it once
    afterwards costs a fraction of that (docs/lineage.md). On SQLite the key costs less
    than handing the row to the driver, and a second copy of every row costs more than it
    saves, so a staging file is written keyed, in one transaction.
    """

    def __init__(self, url: str, *, schema: str | None = None, staging: bool = False) -> None:
        self.url = url
        self.backend = make_url(url).get_backend_name()
        self.schema = (schema or DEFAULT_PG_SCHEMA) if self.backend == "postgresql" else None
        self.staging = staging
        self.engine = _engine(url, self.schema, staging)

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, schema: str | None = None) -> LineageStore:
        store = cls(url, schema=schema)
        store.ensure()
        return store

    def ensure(self) -> None:
        """Create the tables; drop and recreate them if the projection version differs (the
        projector then re-reads the log from offset 0: rebuild, never migrate)."""
        with self._translated("preparing the lineage store"), self.engine.begin() as conn:
            if self.schema:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            inspector = sa.inspect(conn)
            present = set(inspector.get_table_names(schema=self.schema))
            version = None
            if "meta" in present:
                version = conn.execute(
                    sa.select(t.meta.c.value).where(t.meta.c.key == "projection_version")
                ).scalar()
            if present and version != t.PROJECTION_VERSION:
                log.warning(
                    "projection version %s in the store, this code writes %s: dropping the "
                    "projection; it is rebuilt from the log",
                    version,
                    t.PROJECTION_VERSION,
                )
                t.metadata.drop_all(conn)
            if self.staging:
                # a rebuild's indexes are built by `swap_in`, once, from sorted rows: cheaper
                # than keeping them up to date insert by insert (docs/lineage.md)
                for table in t.metadata.sorted_tables:
                    conn.execute(CreateTable(table, if_not_exists=True))
                for table in t.PROJECTED if self.heaps else ():
                    conn.exec_driver_sql(
                        f"CREATE UNLOGGED TABLE IF NOT EXISTS {self.heap(table)} "
                        f"(LIKE {self.qualified(table)})"
                    )
            else:
                t.metadata.create_all(conn)
            if "positions" in present and version == t.PROJECTION_VERSION:
                self._add_anchor_columns(conn, inspector)
            if version != t.PROJECTION_VERSION:
                conn.execute(
                    sa.insert(t.meta),
                    [{"key": "projection_version", "value": t.PROJECTION_VERSION}],
                )

    def _add_anchor_columns(self, conn: Connection, inspector: Any) -> None:
        """A store made before positions kept their log's anchor: the columns are added
        (nullable: the rows there keep no anchor until their next write). Not a projection
        change, so no rebuild: the rows stay, and so do their positions."""
        have = {c["name"] for c in inspector.get_columns("positions", schema=self.schema)}
        for name in t.ANCHOR_COLUMNS:
            if name not in have:
                column = t.positions.c[name]
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(
                    f'ALTER TABLE {self.qualified(t.positions)} ADD COLUMN "{name}" {kind}'
                )
                log.info("lineage store: positions.%s added (log anchors)", name)

    @property
    def heaps(self) -> bool:
        """Whether this store's rows go to heaps first (see the class docstring)."""
        return self.staging and self.backend == "postgresql"

    def heap(self, table: sa.Table) -> str:
        """The qualified name of `table`'s heap."""
        return f'"{self.schema}"."heap_{table.name}"'

    def qualified(self, table: sa.Table) -> str:
        return f'"{self.schema}"."{table.name}"' if self.schema else f'"{table.name}"'

    def consolidate(self) -> None:
        """Move a staging store's heaps into its keyed tables (each table's rows sorted by
        key; of a duplicate, the first copy in the log, lowest topic, partition, offset,
        which is the copy an incremental projection commits first), then build the
        indexes."""
        if self.heaps:
            with self._translated("consolidating the rebuilt store"), self.engine.begin() as conn:
                # sorts of whole tables: in memory, not in temporary files
                conn.exec_driver_sql("SET LOCAL work_mem = '512MB'")
                for table in t.PROJECTED:
                    names = ", ".join(f'"{c.name}"' for c in table.columns)
                    key = [f'"{c.name}"' for c in table.primary_key.columns]
                    order = key + [f'"{c}"' for c in ("topic", "partition", "offset")]
                    conn.exec_driver_sql(
                        f"INSERT INTO {self.qualified(table)} ({names}) "
                        f"SELECT DISTINCT ON ({', '.join(key)}) {names} "
                        f"FROM {self.heap(table)} ORDER BY {', '.join(order)}"
                    )
                    conn.exec_driver_sql(f"DROP TABLE {self.heap(table)}")
        self.build_indexes()

    def build_indexes(self) -> None:
        """Create the indexes that a staging store is projected without (idempotent)."""
        with self._translated("indexing the lineage store"), self.engine.begin() as conn:
            for table in t.metadata.sorted_tables:
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    def drop(self) -> None:
        with self._translated("dropping the lineage store"), self.engine.begin() as conn:
            if self.schema:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            else:
                t.metadata.drop_all(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> LineageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self, what: str = "writing the lineage store") -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._translated(what), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self, what: str = "reading the lineage store") -> Iterator[Connection]:
        with self._translated(what), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except OperationalError as e:
            if self.backend != "sqlite" or _sqlite_transient(e):
                raise TransientError(f"{what}: {_short(e)}") from None
            raise LineageError(f"{what}: {_short(e)}") from None
        except (DBAPIError, SQLAlchemyError) as e:
            raise LineageError(f"{what}: {_short(e)}") from None

    # -- positions -------------------------------------------------------------------------

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset to read per (contract topic, partition), as committed with the rows."""
        with self.reading() as conn:
            rows = conn.execute(sa.select(t.positions)).all()
        return {(r.topic, r.partition): r.next_offset for r in rows}

    def anchored_positions(self) -> dict[tuple[str, int], Position]:
        """`positions` with the anchor of the log each belongs to (None: stored before
        anchors were kept)."""
        with self.reading() as conn:
            rows = conn.execute(sa.select(t.positions)).all()
        return {
            (r.topic, r.partition): Position(
                r.next_offset,
                None
                if r.anchor_offset is None or r.anchor_digest is None
                else Anchor(r.anchor_offset, r.anchor_digest),
            )
            for r in rows
        }

    def forget_position(self, topic: str, partition: int) -> None:
        """Drop one partition's position (its log is a new one, read from its beginning):
        the positions never move backwards, so the old one must go, not be overwritten."""
        with self.transaction("resetting a position of the lineage store") as conn:
            conn.execute(
                sa.delete(t.positions).where(
                    t.positions.c.topic == topic, t.positions.c.partition == partition
                )
            )

    def projection_version(self) -> str | None:
        with self.reading() as conn:
            return conn.execute(
                sa.select(t.meta.c.value).where(t.meta.c.key == "projection_version")
            ).scalar()

    # -- the canonical dump ----------------------------------------------------------------

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every projected row, table by table, sorted by primary key; times as ISO strings.
        No surrogate keys and nothing of the projection's own clock: two stores projected
        from the same log dump byte-identically."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.reading("dumping the lineage store") as conn:
            for table in t.PROJECTED:
                # through the driver: SQLAlchemy's row processing would dominate the dump
                names = [_plain(c.name) for c in table.columns]
                convert = [_converter(c) for c in table.columns]
                order = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
                columns = ", ".join(f'"{n}"' for n in names)
                qualified = f'"{self.schema}"."{table.name}"' if self.schema else f'"{table.name}"'
                rows = conn.exec_driver_sql(f"SELECT {columns} FROM {qualified} ORDER BY {order}")
                out[_plain(table.name)] = [
                    {
                        n: (f(v) if f is not None and v is not None else v)
                        for n, f, v in zip(names, convert, row, strict=True)
                    }
                    for row in rows
                ]
        return out

    def dump_json(self) -> bytes:
        return orjson.dumps(self.dump(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

    def counts(self) -> dict[str, int]:
        with self.reading() as conn:
            return {
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                or 0
                for table in t.PROJECTED
            }


def _converter(column: sa.Column) -> Any:
    """How a raw driver value becomes its canonical JSON form (same on both backends)."""
    if column.name == "time":
        return iso
    if isinstance(column.type, sa.JSON):
        return lambda v: orjson.loads(v) if isinstance(v, str | bytes) else v
    if isinstance(column.type, sa.Boolean):
        return bool  # SQLite answers 0/1
    return None


def _plain(name: str) -> str:
    # names are sqlalchemy `quoted_name`s: plain str keys for the JSON encoder
    return name.encode().decode()


#: What SQLite says, as an OperationalError, of a state that passes (another connection's
#: lock, I/O trouble, a full disk). It says "no such table", "no such column" or a syntax
#: error as an OperationalError too: those a retry does not cure.
_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open", "disk is full")


def _sqlite_transient(error: OperationalError) -> bool:
    message = str(error.orig).lower()
    return any(words in message for words in _SQLITE_TRANSIENT)


def _short(error: Exception, limit: int = 300) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: SQLite settings of a live store. WAL: readers (queries, dumps) never block the projector's
#: writes; NORMAL sync is durable at each commit in WAL mode except on power loss of the OS.
LIVE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL")
#: ... and of a rebuild's staging file, which nobody reads before `swap_in` and which is
#: deleted, not recovered, if the rebuild fails: no journal, no fsync per commit (one fsync
#: of the whole file before it is swapped in), and a page cache that holds the indexes of a
#: million-event store (a maximum, not an allocation). Inserts and commits take about half
#: their time in WAL mode with the default 2 MB cache, and the gap widens with the store's
#: size (docs/lineage.md).
STAGING_PRAGMAS = ("journal_mode=OFF", "synchronous=OFF", "cache_size=-524288")


def _engine(url: str, schema: str | None, staging: bool = False) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        pragmas = STAGING_PRAGMAS if staging else LIVE_PRAGMAS

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            for pragma in pragmas:
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    # A staging schema commits without waiting for its WAL flush: a crash loses the last
    # commits (never consistency), and the rebuild is then started over; the swap's own
    # commit is durable, and with it, in WAL order, everything before it.
    connect_args = {"options": "-c synchronous_commit=off"} if staging else {}
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    return engine.execution_options(schema_translate_map={None: schema})


# -- rebuild: build elsewhere, then swap ------------------------------------------------------


def _remove_files(path: str | None) -> None:
    """A SQLite database file and its journals."""
    if not path:
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def staging_for(store: LineageStore) -> LineageStore:
    """An empty store beside `store` for a rebuild (a sibling file or schema)."""
    if store.backend == "sqlite":
        target = make_url(store.url).database
        if not target or target == ":memory:":
            raise LineageError("an in-memory SQLite store cannot be rebuilt by swapping")
        staging = target + ".rebuild"
        _remove_files(staging)  # a rebuild that was killed
        url = make_url(store.url).set(database=staging).render_as_string(False)
        new = LineageStore(url, staging=True)
    else:
        new = LineageStore(store.url, schema=f"{store.schema}_rebuild", staging=True)
        new.drop()
    new.ensure()
    return new


def discard(staging: LineageStore) -> None:
    """Throw a staging store away (a rebuild that is not swapped in)."""
    staging.close()
    if staging.backend == "sqlite":
        _remove_files(make_url(staging.url).database)
    else:
        staging.drop()
        staging.close()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(staging: LineageStore, store: LineageStore) -> None:
    """Replace `store`'s contents with `staging`'s in one step (file rename or schema rename
    in one transaction); readers see the old store or the new one, never a mix."""
    if staging.staging:
        staging.consolidate()
    staging.close()
    store.close()
    if store.backend == "sqlite":
        source = make_url(staging.url).database
        target = make_url(store.url).database
        assert source and target
        if not staging.staging:
            # checkpoint the WAL into the main file so that the one file renamed is complete
            engine = sa.create_engine(staging.url)
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            engine.dispose()
        _fsync(source)  # the staging file was written without a single fsync
        for suffix in ("-wal", "-shm"):
            if os.path.exists(target + suffix):
                os.remove(target + suffix)
        os.replace(source, target)
        _fsync(os.path.dirname(os.path.abspath(target)))  # the rename itself
        _remove_files(source)  # the staging file's journals, if any
        return
    with store._translated("swapping in the rebuilt store"), store.engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE'))
        conn.execute(sa.text(f'ALTER SCHEMA "{staging.schema}" RENAME TO "{store.schema}"'))

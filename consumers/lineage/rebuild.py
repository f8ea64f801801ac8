"""A rebuild's projection: the whole log into a staging store (`staging_for`), in two
processes. This one reads the records and turns them into rows (`Projector.prepare`: decode,
validate, build the tuples); a writer process writes each batch's rows into the staging
store while this one prepares the next. Reading, preparing and writing each cost a share of
a record's time of the same order: in one process they add up, in two they overlap, and
shipping the rows to the writer (pickled, through a pipe) costs far less than either side
saves (per-record figures: docs/lineage.md).

The staging store is written in one transaction: nobody reads it before `swap_in`, and a
rebuild that fails is thrown away (`discard`), so per-batch commits would buy nothing (and
cost a rebuild into SQLite dearly, each one writing out the index pages it touched).

Both processes run the cyclic garbage collector less often while they rebuild
(`fewer_collections`): each batch makes and frees ~10^5 tuples, dicts and lists, and at
CPython's default threshold (a young collection every 700 new containers) the collector took
a noticeable share of a rebuild; a young collection every 100,000 was faster than both that
and the collector off (docs/lineage.md). What a rebuild
makes is freed by reference counting; the collector only has cycles to find in the rare
exception that carries a traceback.

The writer stops when its pipe closes, whether this process finished, failed or was killed;
its transaction is then rolled back and nothing of the rebuild is left but the staging store
that the next rebuild deletes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import pickle
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from multiprocessing.connection import Connection as Pipe

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.projector import DEFAULT_BATCH, Projector, ProjectStats, Rows, batches
from mlbus.consumers.lineage.store import LineageError, LineageStore
from mlbus.errors import TransientError
from mlbus.kafka.reader import LogRecord
from mlbus.runtime import usable_cores

log = logging.getLogger("mlbus.consumers.lineage")

#: Seconds the writer is given to stop after its pipe closed, before it is terminated.
STOP_SECONDS = 10.0
#: The collector's thresholds while a rebuild runs (see the module doc; CPython's default
#: is (700, 10, 10)): a young collection every 100,000 new containers, the older
#: generations almost never.
REBUILD_GC_THRESHOLDS = (100_000, 50, 1000)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector at REBUILD_GC_THRESHOLDS inside the block, and as
    before after it (process-wide: the collector has one setting per process)."""
    before = gc.get_threshold()
    gc.set_threshold(*REBUILD_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def rebuild(
    staging: LineageStore,
    records: Iterable[LogRecord],
    batch_size: int = DEFAULT_BATCH,
    *,
    writer_process: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProjectStats:
    """Project every record into `staging` (a store made by `staging_for`) in one
    transaction; rows written by a writer process unless `writer_process` is False (the
    default: a writer process when this process may use more than one core). `progress`
    is called with the number of records read so far after each batch."""
    if not staging.staging:
        raise LineageError("a rebuild writes into a staging store (staging_for), not a live one")
    projector = Projector(staging)
    if writer_process is None:
        writer_process = usable_cores() > 1
    if not writer_process:
        with fewer_collections(), staging.transaction("rebuilding the lineage store") as conn:
            return _feed(projector, records, batch_size, progress, partial(projector.write, conn))
    with fewer_collections(), Writer(staging) as writer:
        total = _feed(projector, records, batch_size, progress, writer.write)
        writer.commit()
    return total


def _feed(
    projector: Projector,
    records: Iterable[LogRecord],
    batch_size: int,
    progress: Callable[[int], None] | None,
    write: Callable[[Rows, list[tuple]], None],
) -> ProjectStats:
    """Prepare `records` batch by batch and hand each batch's rows to `write`."""
    total = ProjectStats()
    for batch in batches(records, batch_size):
        rows, positions, stats = projector.prepare(batch)
        write(rows, positions)
        total.add(stats)
        if progress:
            progress(total.records)
    return total


class Writer:
    """A process that writes batches of rows into a staging store, in one transaction,
    committed by `commit`; closed without `commit` (an error, an interrupt), it rolls back."""

    def __init__(self, store: LineageStore) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        rows_out, self._rows = context.Pipe(duplex=False)
        self._outcome, outcome_in = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_write_rows,
            args=(store.url, store.schema, rows_out, outcome_in),
            name="mlbus-lineage-writer",
            daemon=True,
        )
        self._process.start()
        # only the writer holds these ends now: when it exits, this side sees the pipe close
        rows_out.close()
        outcome_in.close()

    def write(self, rows: Rows, positions: list[tuple]) -> None:
        """Hand over a prepared batch (waits while the writer still writes the previous)."""
        tables = [rows[table] for table in t.PROJECTED]
        self._send(pickle.dumps((tables, positions), protocol=5))

    def _send(self, payload: bytes) -> None:
        try:
            self._rows.send_bytes(payload)
        except OSError:  # the writer is gone: say why
            self._raise_failure()

    def commit(self) -> None:
        self._send(b"")  # the end: commit
        self._raise_failure(expect_ok=True)

    def _raise_failure(self, expect_ok: bool = False) -> None:
        try:
            kind, detail = self._outcome.recv()
        except (EOFError, OSError):
            self._process.join(STOP_SECONDS)
            raise LineageError(
                f"the rebuild's writer process exited (code {self._process.exitcode}) "
                "without a word"
            ) from None
        if kind == "committed" and expect_ok:
            return
        raise (TransientError if kind == "transient" else LineageError)(detail)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._rows.close()  # a writer still waiting for rows rolls back and exits
        self._process.join(STOP_SECONDS)
        if self._process.is_alive():
            log.warning("the rebuild's writer did not stop in %ss: terminating it", STOP_SECONDS)
            self._process.terminate()
            self._process.join()
        self._outcome.close()


def _write_rows(url: str, schema: str | None, rows: Pipe, outcome: Pipe) -> None:
    """The writer process: batches from `rows` until an empty message (commit) or the
    pipe's end (roll back); what happened goes back through `outcome`."""
    store = LineageStore(url, schema=schema, staging=True)
    projector = Projector(store)
    answer: tuple[str, str | None]
    try:
        with fewer_collections(), store.transaction("writing the rebuilt lineage store") as conn:
            while payload := rows.recv_bytes():
                tables, positions = pickle.loads(payload)
                projector.write(conn, dict(zip(t.PROJECTED, tables, strict=True)), positions)
        answer = ("committed", None)
    except EOFError:
        return  # the rebuild is gone; the transaction was rolled back
    except TransientError as e:
        answer = ("transient", str(e))
    except LineageError as e:
        answer = ("error", str(e))
    except Exception as e:  # a defect: reported to the rebuild, which raises it
        answer = ("error", f"the rebuild's writer failed: {type(e).__name__}: {e}")
    finally:
        store.close()
    with contextlib.suppress(OSError):  # the rebuild may be gone
        outcome.send(answer)

"""`mlbus archive run|restore` and `mlbus replay`: the log kept on the object store for years,
and audits reading it back — from Kafka or from the archive — without joining any group.
The archive's modules (pyarrow: slow to import) are imported by the commands that use them, not at
every command's start."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from mlbus.cli.common import app, console, kafka_config, settings
from mlbus.cli.render import printable
from mlbus.errors import InvalidEvent, MlbusError
from mlbus.kafka.reader import LogRecord, read_log
from mlbus.schemas.catalog import topic
from mlbus.schemas.codec import decode
from mlbus.services import Service, service
from mlbus.settings import Settings
from mlbus.storage import ObjectStore

log = logging.getLogger("mlbus.consumers.archive")

archive_app = typer.Typer(
    help="The log archived as Parquet on the object store.", no_args_is_help=True
)
app.add_typer(archive_app, name="archive")


class Source(StrEnum):
    kafka = "kafka"
    archive = "archive"


class Format(StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"
    table = "table"


# -- mlbus archive run ----------------------------------------------------------------------


@archive_app.command("run")
def run(
    group: Annotated[
        str | None,
        typer.Option(help="consumer group of the archiver [default: <topic prefix>mlbus-archive]"),
    ] = None,
    until_end: Annotated[
        bool, typer.Option("--until-end", help="archive what is there now, then exit")
    ] = False,
) -> None:
    """Archive every contract topic to Parquet files on the object store (runs until
    SIGTERM/SIGINT, which flush and commit first). Exactly once per record: see
    consumers/archive/writer.py. Without options, the same as `mlbus run archive`."""
    _archive(service("archive"), settings(), group, until_end)


def run_archive(manifest: Service, cfg: Settings) -> None:
    """The archiver in the foreground (`mlbus run archive`)."""
    _archive(manifest, cfg, None, False)


def _archive(manifest: Service, cfg: Settings, group: str | None, until_end: bool) -> None:
    from mlbus.consumers.archive.writer import Archiver

    group = group or manifest.group_id(cfg.topic_prefix)
    store = ObjectStore.from_settings(cfg)
    archiver = Archiver(
        kafka_config(cfg),
        store,
        group=group,
        flush_bytes=cfg.archive.flush_bytes,
        flush_seconds=cfg.archive.flush_seconds,
        on_new_log=cfg.positions.on_new_log,
    )
    log.info("archive: writing to %s/archive (group %s)", store.url, group)
    stats = archiver.run(stop_at_end=until_end)
    log.info(
        "archive: stopped; %d records in %d files (%d bytes) this run",
        stats.records,
        stats.files,
        stats.bytes,
    )


# -- mlbus archive restore ------------------------------------------------------------------


@archive_app.command("restore")
def restore(
    topics: Annotated[list[str], typer.Argument(metavar="TOPIC...", help="e.g. dataset.created")],
    source: Annotated[
        str | None,
        typer.Option(help="object store holding the archive (default: the configured one)"),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="restore into non-empty topics, skipping the events they hold"),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines report")] = False,
) -> None:
    """Re-publish archived records into the current cluster with their event ids, keys,
    headers and timestamps (idempotent producer). Refuses non-empty topics unless --force,
    which then skips every event already there: safe to run again."""
    from mlbus.consumers.archive.restore import restore as restore_archive

    cfg = settings()
    store = _store(source, cfg)
    reports = restore_archive(kafka_config(cfg), store, topics, force=force)
    if json_out:
        for r in reports:
            sys.stdout.buffer.write(orjson.dumps(r.__dict__) + b"\n")
        return
    table = Table("topic", "archived", "published", "already there")
    for r in reports:
        table.add_row(r.topic, str(r.archived), str(r.published), str(r.skipped))
    console.print(table)


def _store(url: str | None, cfg: Any) -> ObjectStore:
    if url is None:
        return ObjectStore.from_settings(cfg)
    return ObjectStore(url, s3_endpoint_url=cfg.s3_endpoint_url or None)


# -- mlbus replay ---------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, now: datetime | None = None) -> int:
    """Epoch milliseconds of an ISO-8601 time (UTC when it has no offset) or of a time
    relative to now (`90s`, `15m`, `2h`, `3d`, `1w`: that long ago)."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        ago = timedelta(**{_UNITS[match[2]]: float(match[1])})
        return int(((now or datetime.now(UTC)) - ago).timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MlbusError(
            f"time {text!r}: use ISO-8601 (2026-03-01T14:00:00Z) or an age like 2h, 3d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@app.command()
def replay(
    topics: Annotated[list[str], typer.Argument(metavar="TOPIC...", help="e.g. model.promoted")],
    since: Annotated[str | None, typer.Option(help="from this time (ISO-8601 or 2h, 3d)")] = None,
    until: Annotated[str | None, typer.Option(help="up to this time (inclusive)")] = None,
    key: Annotated[str | None, typer.Option(help="only records with this key")] = None,
    output_format: Annotated[Format, typer.Option("--format")] = Format.jsonl,
    source: Annotated[Source, typer.Option(help="read Kafka or the archive")] = Source.kafka,
    output: Annotated[
        Path | None, typer.Option(help="write here instead of stdout (required for parquet)")
    ] = None,
) -> None:
    """Print the records of topics as they are in the log (or the archive), in order within
    each partition. Joins no consumer group and commits nothing: nobody's offsets move."""
    names = [topic(t).name for t in topics]
    since_ms = None if since is None else parse_time(since)
    until_ms = None if until is None else parse_time(until)
    if output_format is Format.parquet and output is None:
        raise MlbusError("--format parquet writes a file: give --output FILE")
    cfg = settings()
    if source is Source.kafka:
        records = read_log(kafka_config(cfg), names, since_ms=since_ms, until_ms=until_ms)
    else:
        from mlbus.consumers.archive.reader import read_archive

        records = read_archive(
            ObjectStore.from_settings(cfg), names, since_ms=since_ms, until_ms=until_ms
        )
    if key is not None:
        wanted = key.encode()
        records = (r for r in records if r.key == wanted)
    if output_format is Format.parquet:
        assert output is not None
        count = write_parquet(records, output)
        console.print(f"{count} records written to {output}", highlight=False)
    elif output_format is Format.table:
        _table(records, output)
    elif output is None:
        _jsonl(records, sys.stdout.buffer)
    else:
        with _open(output) as out:
            _jsonl(records, out)


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "wb")
    except OSError as e:
        raise MlbusError(f"cannot write {path}: {e.strerror}") from None


def _iso(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds")


def as_document(record: LogRecord) -> dict[str, Any]:
    """One record for `--format jsonl`: where it is, and the event as stored (the
    CloudEvent JSON; a binary-mode event decoded into one), or why it is not an event."""
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": _iso(record.timestamp_ms),
        "key": printable(record.key),
    }
    binary = any(k.startswith("ce_") for k, _ in record.headers)
    if not binary and record.value:
        try:
            parsed = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            out["event"] = parsed
            return out
    try:
        event = decode(
            record.value, list(record.headers), expected_type=record.topic, max_bytes=1 << 31
        )
        out["event"] = event.model_dump(mode="json", exclude_none=True)
    except InvalidEvent as e:
        out["invalid"] = e.reason
        out["raw"] = printable(record.value)
    return out


def _jsonl(records: Iterable[LogRecord], out: IO[bytes]) -> None:
    for record in records:
        out.write(orjson.dumps(as_document(record)) + b"\n")
    out.flush()


def _table(records: Iterable[LogRecord], output: Path | None) -> None:
    from mlbus.consumers.archive.layout import identity

    table = Table("time", "topic", "where", "key", "type")
    # An auditor copies ids out of this table: never shortened, whatever the terminal width.
    table.add_column("id", no_wrap=True, overflow="fold", min_width=36)
    for r in records:
        event_id, event_type = identity(r.value, r.headers)
        table.add_row(
            (_iso(r.timestamp_ms) or "-")[:23],
            r.topic,
            f"{r.partition}@{r.offset}",
            escape(printable(r.key) or "-"),
            event_type or "[red]not an event[/]",
            event_id or "-",
        )
    if output is None:
        console.print(table)
        return
    from rich.console import Console

    with _open(output) as raw:
        Console(file=_TextOut(raw), width=200).print(table)  # type: ignore[arg-type]  # rich only writes and flushes


class _TextOut:
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(text.encode())

    def flush(self) -> None:
        self.raw.flush()


def _chunks(records: Iterable[LogRecord], size: int) -> Iterator[list[LogRecord]]:
    chunk: list[LogRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_parquet(records: Iterable[LogRecord], path: Path) -> int:
    """Records into one Parquet file with the archive's columns; how many."""
    import pyarrow.parquet as pq

    from mlbus.consumers.archive.layout import archive_schema, archive_table

    count = 0
    try:
        with pq.ParquetWriter(str(path), archive_schema(), compression="zstd") as writer:
            for chunk in _chunks(records, 50_000):
                table = archive_table(
                    [r.topic for r in chunk],
                    [r.partition for r in chunk],
                    [r.offset for r in chunk],
                    [r.timestamp_ms for r in chunk],
                    [r.key for r in chunk],
                    [r.headers for r in chunk],
                    [r.value for r in chunk],
                )
                writer.write_table(table)
                count += len(chunk)
    except OSError as e:
        raise MlbusError(f"cannot write {path}: {e}") from None
    return count

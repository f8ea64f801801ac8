"""`mlbus publish`, `mlbus tail` and `mlbus deadletters`: events in and out by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from mlbus.cli.common import app, console, kafka_config, settings
from mlbus.cli.render import as_json, as_line, decode_record
from mlbus.errors import InvalidEvent, MlbusError
from mlbus.kafka.producer import DurableProducer
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import DEADLETTER, topic
from mlbus.schemas.codec import decode, decode_payload
from mlbus.schemas.deadletter import DeadLetter
from mlbus.schemas.envelope import Event


def _documents(text: str) -> list[tuple[int, bytes]]:
    """(line number, JSON) for a single JSON object or JSON Lines."""
    stripped = text.strip()
    if not stripped:
        raise InvalidEvent("no data: the input is empty")
    try:
        orjson.loads(stripped)
        return [(1, stripped.encode())]
    except orjson.JSONDecodeError:
        pass
    return [
        (n, line.strip().encode())
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def _parse(event_type: str, document: bytes) -> Event | Payload:
    """A full CloudEvent (it has `specversion`) or a bare payload of `event_type`."""
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError as e:
        raise InvalidEvent(f"not valid JSON ({e})") from None
    if isinstance(parsed, dict) and "specversion" in parsed:
        return decode(document, expected_type=event_type)
    return decode_payload(event_type, document)


@app.command()
def publish(
    topic_name: Annotated[str, typer.Argument(metavar="TOPIC", help="e.g. dataset.created")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="JSON file (a payload, a CloudEvent, or JSON Lines of either), or - for stdin",
        ),
    ],
    key: Annotated[
        str | None, typer.Option(help="record key (default: the topic's key field)")
    ] = None,
    subject: Annotated[str | None, typer.Option(help="CloudEvents subject")] = None,
    source: Annotated[str, typer.Option(help="CloudEvents source")] = "mlbus/cli",
    correlation_id: Annotated[
        str | None, typer.Option(help="tie the event to a pipeline run")
    ] = None,
) -> None:
    """Validate, wrap in the CloudEvents envelope, publish, and print each event id.

    Every document is validated before anything is published: one invalid document means
    nothing is published."""
    spec = topic(topic_name)
    text = sys.stdin.read() if data == "-" else _read(data)
    items = []
    for line, document in _documents(text):
        try:
            items.append(_parse(spec.name, document))
        except InvalidEvent as e:
            where = f" (line {line})" if line > 1 or "\n" in text.strip() else ""
            raise InvalidEvent(
                f"invalid {spec.name}{where}: {e.reason}; nothing was published"
            ) from None
    kafka = kafka_config()
    with DurableProducer(kafka, source=source) as producer:
        ids = []
        for item in items:
            if isinstance(item, Event):
                producer.send(item, key=key)
                ids.append(item.id)
            else:
                ids.append(
                    producer.publish(
                        item, key=key, subject=subject, correlationid=correlation_id
                    ).id
                )
    for event_id in ids:
        console.print(event_id, highlight=False)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise MlbusError(f"cannot read {path}: {e.strerror}") from None


@app.command()
def tail(
    topic_name: Annotated[str, typer.Argument(metavar="TOPIC")],
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="start at the oldest record")
    ] = False,
    json_lines: Annotated[
        bool, typer.Option("--json", help="JSON lines instead of a table")
    ] = False,
    follow: Annotated[bool, typer.Option(help="keep waiting for new records")] = True,
    max_records: Annotated[int | None, typer.Option("--max", help="stop after N records")] = None,
) -> None:
    """Show every record of a topic: decoded events, and records that do not validate shown
    raw and marked with the reason."""
    spec = topic(topic_name)
    cfg = settings()
    kafka = kafka_config(cfg)
    reader = TopicReader(
        kafka,
        [kafka.topic(spec.name)],
        start="beginning" if from_beginning else "end",
        follow=follow,
    )
    count = 0
    try:
        for message in reader:
            decoded = decode_record(message, spec.name, cfg.max_event_bytes)
            if json_lines:
                sys.stdout.buffer.write(as_json(message, decoded) + b"\n")
                sys.stdout.flush()
            else:
                console.print(
                    as_line(message, decoded, width=max(40, console.width - 60)), highlight=False
                )
            count += 1
            if max_records is not None and count >= max_records:
                break
    except KeyboardInterrupt:
        pass


@app.command()
def deadletters(
    json_lines: Annotated[
        bool, typer.Option("--json", help="JSON lines instead of a table")
    ] = False,
    follow: Annotated[bool, typer.Option(help="keep waiting for new dead letters")] = False,
) -> None:
    """Records some consumer could not process: where they came from and why."""
    cfg = settings()
    kafka = kafka_config(cfg)
    reader = TopicReader(kafka, [kafka.topic(DEADLETTER)], start="beginning", follow=follow)
    table = Table("time", "original", "consumer", "error", "reason", "value", show_lines=False)
    rows = 0
    try:
        for message in reader:
            decoded = decode_record(message, DEADLETTER, 64 * 1024 * 1024)
            if json_lines:
                sys.stdout.buffer.write(as_json(message, decoded, preview=200) + b"\n")
                sys.stdout.flush()
                continue
            rows += 1
            if isinstance(decoded, str):
                table.add_row("-", "-", "-", "-", f"[red]not a dead letter:[/] {decoded}", "")
                continue
            letter: DeadLetter = decoded.data
            o = letter.original
            preview = _preview(letter)
            table.add_row(
                decoded.time.isoformat(timespec="seconds") if decoded.time else "-",
                f"{o.topic}/{o.partition}@{o.offset}",
                f"{letter.consumer or '-'} ({letter.consumer_group or '-'})",
                letter.error_type,
                letter.reason,
                preview,
            )
            if follow:
                console.print(table)
                table = Table("time", "original", "consumer", "error", "reason", "value")
    except KeyboardInterrupt:
        pass
    if not json_lines and not follow:
        if rows:
            console.print(table)
        else:
            console.print("[green]no dead letters[/]")


def _preview(letter: DeadLetter, limit: int = 40) -> str:
    from mlbus.kafka.deadletter import original_value

    raw = original_value(letter)
    if raw is None:
        return f"({letter.original.value_size} bytes, not copied)"
    text = raw[:limit].decode("utf-8", "replace")
    return text + ("…" if len(raw) > limit else "") + f" [dim]({len(raw)} B)[/]"

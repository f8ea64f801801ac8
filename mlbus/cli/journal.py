"""`mlbus journal verify` and `mlbus journal repair`: check the embedded broker's journal
(`<data_dir>/journal`) without starting anything, and cut a torn tail on request only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mlbus.cli.common import app, console, settings
from mlbus.errors import JournalError, JournalUnreadable
from mlbus.journal.format import (
    GROUPS_FILE,
    TOPICS_FILE,
    VERSION,
    Scan,
    read_journal,
    read_json,
    segments,
)
from mlbus.lock import DataDirLock

journal_app = typer.Typer(help="The embedded broker's journal.", no_args_is_help=True)
app.add_typer(journal_app, name="journal")


def _directory(path: Path | None) -> Path:
    return path if path is not None else settings().data_dir / "journal"


def _scan(directory: Path) -> Scan:
    scan = Scan()
    for _ in read_journal(directory, scan):
        pass
    read_json(directory / TOPICS_FILE)
    read_json(directory / GROUPS_FILE)
    return scan


@journal_app.command("verify")
def verify(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="journal folder [default: <data dir>/journal]")
    ] = None,
) -> None:
    """Read every segment and side file of the journal: format version, every frame's
    checksum, torn final writes. Changes nothing. Exit 1 if it cannot be restored."""
    where = _directory(directory)
    if not where.is_dir():
        raise JournalUnreadable(f"no journal at {where}")
    try:
        scan = _scan(where)
    except JournalError as e:
        console.print(f"[red]journal {where}: cannot be restored[/]: {e}")
        raise typer.Exit(1) from None
    table = Table("topic", "records", title=f"journal {where} (format {VERSION})")
    for topic, count in sorted(scan.per_topic.items()):
        table.add_row(topic, f"{count:,}")
    console.print(table)
    groups = read_json(where / GROUPS_FILE).get("groups", {})
    console.print(
        f"{scan.segments} segments, {scan.frames:,} frames, {scan.records:,} records, "
        f"{scan.bytes:,} bytes; offsets of {len(groups)} consumer groups"
    )
    for torn in scan.torn:
        console.print(
            f"[yellow]torn final write[/] in {torn.segment.name} at byte {torn.position} "
            f"({torn.size} bytes, {torn.reason}): a restore skips it "
            "(`mlbus journal repair` cuts it off)"
        )
    if not scan.torn:
        console.print("[green]ok[/]: every frame checks out")


@journal_app.command("repair")
def repair(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="journal folder [default: <data dir>/journal]")
    ] = None,
) -> None:
    """Cut each torn final write off its segment (a restore skips them anyway). Damage
    anywhere else is refused: nothing is changed then."""
    where = _directory(directory)
    with DataDirLock(where.parent):  # never under a running platform
        scan = _scan(where)  # raises before anything is changed
        for torn in scan.torn:
            with open(torn.segment, "r+b") as f:
                f.truncate(torn.position)
                os.fsync(f.fileno())
            console.print(f"cut {torn.size} bytes off {torn.segment.name} at byte {torn.position}")
        if not scan.torn:
            console.print(f"nothing to repair in {where} ({len(segments(where))} segments)")

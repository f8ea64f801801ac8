"""The journal's files (mlbus/journal/format.py): records come back exactly as written; a
torn final write is reported and skipped with the file left as it is; a damaged, foreign or
newer journal is refused and left untouched; `mlbus journal verify` and `repair`."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mlbus.errors import JournalTooNew, JournalUnreadable
from mlbus.journal.format import (
    GROUPS_FILE,
    Record,
    Scan,
    SegmentWriter,
    encode_batch,
    read_journal,
    read_json,
    segments,
    write_json,
)
from tests.mlbus.test_cli import clean_env

pytestmark = pytest.mark.unit

MLBUS = str(Path(sys.executable).parent / "mlbus")

RECORDS = [
    Record(0, 1_700_000_000_000, 1, b"k", b"v", [("a", b"1"), ("a", b"2"), ("n", None)]),
    Record(1, 1_700_000_000_001, 1, None, None, None),
    Record(2, 1_700_000_000_002, 1, b"", b"", [("e", b"")]),
    Record(3, -1, 0, b"\x00\xff", b"x" * 70_000, None),
]


def write(directory: Path, batches: list[tuple[str, int, list[Record]]]) -> Path:
    writer = SegmentWriter(directory)
    for topic, partition, records in batches:
        writer.write(encode_batch(topic, partition, records))
    writer.close()
    return writer.path


def read_all(directory: Path) -> tuple[list[tuple[str, int, list[Record]]], Scan]:
    scan = Scan()
    out = [(b.topic, b.partition, b.records) for b in read_journal(directory, scan)]
    return out, scan


def test_records_come_back_exactly_as_written_across_segments(tmp_path: Path) -> None:
    write(tmp_path, [("a.t", 0, RECORDS[:2]), ("b.é", 5, RECORDS[2:])])
    write(tmp_path, [("a.t", 0, [Record(2, 5, 1, b"k2", b"v2", None)])])
    batches, scan = read_all(tmp_path)
    assert batches == [
        ("a.t", 0, RECORDS[:2]),
        ("b.é", 5, RECORDS[2:]),
        ("a.t", 0, [Record(2, 5, 1, b"k2", b"v2", None)]),
    ]
    assert (scan.segments, scan.frames, scan.records, scan.torn) == (2, 3, 5, [])
    assert scan.per_topic == {"a.t": 3, "b.é": 2}
    assert [p.name for p in segments(tmp_path)] == ["segment-00000001.mlj", "segment-00000002.mlj"]


@pytest.mark.parametrize("cut", [1, 7, 100, 1000], ids=lambda n: f"cut{n}")
def test_a_torn_final_write_is_reported_and_skipped_and_the_file_left_as_it_is(
    tmp_path: Path, cut: int
) -> None:
    path = write(tmp_path, [("t", 0, RECORDS[:2]), ("t", 0, RECORDS[2:])])
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # the process died in the middle of its last write
    torn = path.read_bytes()
    batches, scan = read_all(tmp_path)
    assert batches == [("t", 0, RECORDS[:2])]
    assert len(scan.torn) == 1
    assert scan.torn[0].segment == path
    assert scan.torn[0].size == len(torn) - scan.torn[0].position
    assert path.read_bytes() == torn


def test_a_final_frame_of_zeros_or_garbage_is_a_torn_write(tmp_path: Path) -> None:
    path = write(tmp_path, [("t", 0, RECORDS[:2])])
    with open(path, "ab") as f:
        f.write(b"\0" * 64)  # a file system that extended the file before the data landed
    batches, scan = read_all(tmp_path)
    assert batches == [("t", 0, RECORDS[:2])] and len(scan.torn) == 1
    data = path.read_bytes()[:-64]
    frame = encode_batch("t", 0, RECORDS[2:])
    path.write_bytes(data + frame[:-3] + b"zzz")  # complete length, wrong bytes at the end
    batches, scan = read_all(tmp_path)
    assert batches == [("t", 0, RECORDS[:2])]
    assert scan.torn[0].reason == "a frame failing its checksum"


def test_damage_before_the_tail_refuses_the_journal_and_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, [("t", 0, RECORDS[:2]), ("t", 0, RECORDS[2:])])
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # inside the first frame's body: the second frame follows it whole
    path.write_bytes(bytes(data))
    with pytest.raises(JournalUnreadable, match="damaged, not torn"):
        read_all(tmp_path)
    assert path.read_bytes() == bytes(data)


def test_a_newer_format_is_refused_before_anything_is_read_and_left_untouched(
    tmp_path: Path,
) -> None:
    write(tmp_path, [("t", 0, RECORDS[:2])])
    newer = write(tmp_path, [("t", 0, RECORDS[2:])])
    data = bytearray(newer.read_bytes())
    struct.pack_into("<H", data, 8, 99)
    newer.write_bytes(bytes(data))
    seen = []
    with pytest.raises(JournalTooNew, match="format 99 was written by a newer mlbus"):
        for batch in read_journal(tmp_path):
            seen.append(batch)
    assert seen == [], "a restore must not start on a journal it cannot finish"
    assert newer.read_bytes() == bytes(data)


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "segment-00000001.mlj").write_bytes(b"PK\x03\x04 not a journal at all")
    with pytest.raises(JournalUnreadable, match="bad magic"):
        read_all(tmp_path)
    (tmp_path / "segment-00000001.mlj").write_bytes(b"MLB")
    with pytest.raises(JournalUnreadable, match="shorter than a journal header"):
        read_all(tmp_path)


def test_side_files_are_replaced_whole_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / GROUPS_FILE
    assert read_json(path) == {}
    write_json(path, {"format": 1, "groups": {"g": {"t": {"0": 3}}}})
    assert read_json(path)["groups"] == {"g": {"t": {"0": 3}}}
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text('{"format": 7}')
    with pytest.raises(JournalTooNew):
        read_json(path)
    path.write_text("{not json")
    with pytest.raises(JournalUnreadable, match="not JSON"):
        read_json(path)


def test_a_new_writer_never_appends_to_an_existing_segment(tmp_path: Path) -> None:
    first = write(tmp_path, [("t", 0, RECORDS[:1])])
    before = first.read_bytes()
    second = write(tmp_path, [("t", 0, RECORDS[1:2])])
    assert second != first and first.read_bytes() == before


# -- mlbus journal verify / repair ------------------------------------------------------------


def journal_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MLBUS, "--data-dir", str(data_dir), "journal", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(COLUMNS="200"),
    )


@pytest.mark.integration  # subprocesses
def test_verify_reports_a_torn_tail_and_repair_cuts_it_off(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    path = write(journal, [("t", 0, RECORDS[:2]), ("t", 0, RECORDS[2:])])
    intact = path.read_bytes()
    ok = journal_cli("verify", data_dir=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "4 records" in ok.stdout and "every frame checks out" in ok.stdout
    path.write_bytes(intact[:-5])
    torn = journal_cli("verify", data_dir=tmp_path)
    assert torn.returncode == 0, torn.stderr
    assert "torn final write" in torn.stdout and "2 records" in torn.stdout
    assert path.read_bytes() == intact[:-5], "verify changes nothing"
    repaired = journal_cli("repair", data_dir=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert "cut" in repaired.stdout
    batches, scan = read_all(journal)
    assert batches == [("t", 0, RECORDS[:2])] and scan.torn == []


@pytest.mark.integration  # subprocesses
def test_verify_and_repair_refuse_a_newer_journal_and_change_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "journal", [("t", 0, RECORDS)])
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    path.write_bytes(bytes(data))
    verify = journal_cli("verify", data_dir=tmp_path)
    assert verify.returncode == 1
    assert "newer mlbus" in " ".join(verify.stdout.split())
    repair = journal_cli("repair", data_dir=tmp_path)
    assert repair.returncode == 1
    assert "newer mlbus" in " ".join(repair.stderr.split())
    assert path.read_bytes() == bytes(data)

"""Inputs a dataset version can be registered from, each read as a stream of Arrow record
batches (never whole in memory): Parquet, CSV, a NumPy `.npz`, or an in-memory table.
Unreadable or malformed input raises `InvalidDataset` naming the problem. An `.npz` is read
whole, so its members' declared uncompressed sizes are checked against a limit
(`limits.max_archive_bytes`) before any member is decompressed. A Parquet file is read one
row group at a time, so its row groups' declared uncompressed sizes are checked against
`limits.max_row_group_bytes` from the footer before any is read."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from mlbus.datasets.formats import FORMATS, READ_BATCH_ROWS, InvalidDataset
from mlbus.settings import LimitsSettings
from mlbus.tables import check_row_groups, iter_row_groups

__all__ = [
    "FORMATS",
    "READ_BATCH_ROWS",
    "InvalidDataset",
    "Source",
    "from_table",
    "npz_table",
    "open_source",
    "open_stream",
]


@dataclass
class Source:
    """A schema and the batches that follow it; `size` is the input's bytes, if known."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    size: int | None
    description: str


def open_source(
    path: str | Path,
    fs: Any = None,
    format: str | None = None,
    *,
    max_archive_bytes: int | None = None,
    max_row_group_bytes: int | None = None,
) -> Source:
    """Open a Parquet, CSV or .npz file (by suffix unless `format` says) on `fs` (local by
    default); an .npz may unpack to `max_archive_bytes`, a Parquet row group to
    `max_row_group_bytes` (the settings' defaults unless given)."""
    name = str(path)
    kind = format or Path(name).suffix.lower().lstrip(".")
    opener = fs.open if fs is not None else open
    try:
        size = fs.size(name) if fs is not None else Path(name).stat().st_size
    except (FileNotFoundError, OSError):
        raise InvalidDataset(f"{name}: no such file") from None
    if size == 0:
        raise InvalidDataset(f"{name}: the file is empty")
    if kind not in FORMATS:
        raise InvalidDataset(f"{name}: unknown format {kind!r} (parquet, csv or npz)")
    local = fs is None or "file" in getattr(fs, "protocol", ())
    if local and kind != "npz":
        # pyarrow's native file reader: no Python file object, no copies into Python bytes.
        return open_stream(
            pa.OSFile(name, "rb"), size, name, kind, max_row_group_bytes=max_row_group_bytes
        )
    return open_stream(
        opener(name, "rb"),
        size,
        name,
        kind,
        max_archive_bytes=max_archive_bytes,
        max_row_group_bytes=max_row_group_bytes,
    )


def open_stream(
    handle: Any,
    size: int | None,
    name: str,
    kind: str,
    *,
    max_archive_bytes: int | None = None,
    max_row_group_bytes: int | None = None,
) -> Source:
    """A source from an open binary file (an upload, say); `kind` is a FORMATS entry."""
    if size == 0:
        handle.close()
        raise InvalidDataset(f"{name}: the file is empty")
    if kind in ("parquet", "pq"):
        limit = max_row_group_bytes or LimitsSettings().max_row_group_bytes
        return _parquet(handle, size or 0, name, limit)
    if kind in ("csv", "txt"):
        return _csv(handle, size or 0, name)
    if kind == "npz":
        import numpy as np

        limit = max_archive_bytes or LimitsSettings().max_archive_bytes
        with handle:
            try:
                _check_unpacked_size(handle, name, limit)
                arrays = dict(np.load(handle, allow_pickle=False))
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise InvalidDataset(f"{name}: not a readable .npz ({e})") from None
            except MemoryError:  # an array header that claims more than the member holds
                raise InvalidDataset(f"{name}: an array larger than memory") from None
        return from_table(npz_table(arrays, name), name, size)
    handle.close()
    raise InvalidDataset(f"{name}: unknown format {kind!r} (parquet, csv or npz)")


def _check_unpacked_size(handle: Any, name: str, limit: int) -> None:
    """Refuse an archive whose members declare more than `limit` uncompressed bytes, from
    its central directory alone. A member cannot unpack past its declared size: zipfile
    stops there, and the CRC check then fails."""
    with zipfile.ZipFile(handle) as archive:
        unpacked = sum(member.file_size for member in archive.infolist())
    if unpacked > limit:
        raise InvalidDataset(
            f"{name}: its members unpack to {unpacked} bytes, over the limit of {limit} "
            "bytes (MLBUS_LIMITS__MAX_ARCHIVE_BYTES); register large data as Parquet"
        )
    handle.seek(0)


def _parquet(handle: Any, size: int, name: str, max_row_group_bytes: int) -> Source:
    try:
        file = pq.ParquetFile(handle, pre_buffer=False)
        check_row_groups(file, name, max_row_group_bytes, InvalidDataset)
    except (pa.ArrowInvalid, OSError) as e:
        handle.close()
        raise InvalidDataset(f"{name}: not a Parquet file ({e})") from None
    except InvalidDataset:
        handle.close()
        raise

    def batches() -> Iterator[pa.RecordBatch]:
        # One row group decoded at a time (pre-buffering off: it would keep every row
        # group's compressed bytes until the end), each released before the next is read.
        try:
            yield from iter_row_groups(file, batch_size=READ_BATCH_ROWS)
        except pa.ArrowInvalid as e:
            raise InvalidDataset(f"{name}: corrupt Parquet ({e})") from None
        finally:
            handle.close()

    return Source(file.schema_arrow, batches(), size, name)


def _csv(handle: Any, size: int, name: str) -> Source:
    try:
        # Small blocks: pyarrow reads ahead many blocks in the background, so the block size
        # bounds memory. Types are inferred from the first block.
        reader = pcsv.open_csv(handle, read_options=pcsv.ReadOptions(block_size=1 << 20))
    except pa.ArrowInvalid as e:
        handle.close()
        raise InvalidDataset(f"{name}: not a readable CSV ({_csv_reason(e)})") from None

    text_columns = [f.name for f in reader.schema if pa.types.is_string(f.type)]

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                for column in text_columns:
                    _refuse_mixed(batch.column(column), column, name)
                yield batch
        except pa.ArrowInvalid as e:
            # Types are inferred from the first block; a later value of another type fails.
            raise InvalidDataset(f"{name}: {_csv_reason(e, reader.schema.names)}") from None
        finally:
            handle.close()

    return Source(reader.schema, batches(), size, name)


_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def _refuse_mixed(column: pa.Array, column_name: str, name: str) -> None:
    """A text column in which some values are numbers is almost always a data error (a
    stray "n/a", a unit typed into a cell): refuse it rather than train on strings."""
    import pyarrow.compute as pc

    values = column.drop_null()
    values = pc.filter(values, pc.not_equal(pc.utf8_trim_whitespace(values), ""))
    if len(values) == 0:
        return
    numeric = pc.match_substring_regex(values, _NUMBER)
    count = pc.sum(numeric).as_py() or 0
    if 0 < count < len(values):
        text = pc.filter(values, pc.invert(numeric))[0].as_py()
        raise InvalidDataset(
            f"{name}: column {column_name!r} has mixed types: {count} of {len(values)} values "
            f"are numbers, the others text (e.g. {text!r})"
        )


def _csv_reason(error: Exception, names: Sequence[str] = ()) -> str:
    text = str(error)
    found = re.search(r"In CSV column #(\d+)", text)
    if found and int(found.group(1)) < len(names):
        text = text.replace(found.group(0), f"column {names[int(found.group(1))]!r}")
    if "conversion error" in text:
        return text.replace("In CSV column", "column") + " (a column with mixed types)"
    return text


def npz_table(arrays: dict[str, Any], name: str = "npz") -> pa.Table:
    """`X` (2-D: one column per feature, f0…fn) and `y` (label), or 1-D named arrays."""
    import numpy as np

    columns: dict[str, Any] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.ndim == 2:
            for i in range(value.shape[1]):
                columns[f"f{i}"] = value[:, i]
        elif value.ndim == 1:
            columns["label" if key == "y" else key] = value
        else:
            raise InvalidDataset(f"{name}: array {key!r} has {value.ndim} dimensions (1 or 2)")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise InvalidDataset(f"{name}: arrays of different lengths {sorted(lengths)}")
    return pa.table(columns)


def from_table(table: pa.Table, description: str = "table", size: int | None = None) -> Source:
    return Source(
        table.schema, iter(table.to_batches(READ_BATCH_ROWS)), size or table.nbytes, description
    )

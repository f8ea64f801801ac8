"""What the dataset modules share without pyarrow: the error an unusable input raises, the
formats an input may have and the rows per batch inputs are read in. Kept apart from
sources.py so that the services which only look dataset versions up or wait for one (the
control-plane API, an idle validator) start without loading pyarrow (bench/idle.py)."""

from __future__ import annotations

from mlbus.errors import Invalid

#: Rows per batch read from inputs: the writer's row-group size, so that re-cutting input
#: into canonical row groups is zero-copy.
READ_BATCH_ROWS = 131_072

#: Input formats, by file suffix (`open_source`'s `format`).
FORMATS = ("parquet", "pq", "csv", "txt", "npz")


class InvalidDataset(Invalid):
    """The input cannot become a dataset version (unreadable, empty, malformed)."""

"""Archive: the log written to Parquet on the object store for long retention and restore.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

#: The archiver's consumer group (here, not in writer.py: the CLI names it in its options
#: without importing pyarrow).
DEFAULT_GROUP = "mlbus.archive"

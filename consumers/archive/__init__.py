"""Archive: the log written to Parquet on the object store for long retention and restore.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

"""Dataset manager: versioned Parquet datasets on the object store; publishes dataset.created.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

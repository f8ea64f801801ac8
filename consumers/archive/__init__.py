"""Archive: the log written to Parquet on the object store for long retention and restore.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

from mlbus.services import service

#: The archiver's consumer group without a topic prefix, from its manifest (mlbus/services.py).
DEFAULT_GROUP = service("archive").group_id()

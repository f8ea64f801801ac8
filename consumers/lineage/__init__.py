"""Metadata and lineage store: a SQL projection of the log, lineage and audit queries.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

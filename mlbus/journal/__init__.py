"""The embedded broker's journal: every record and every group's committed offsets kept in
local append-only files while `mlbus up` runs (capture.py), and replayed into the fresh
broker of the next `mlbus up` (restore.py). The file format is format.py; docs/broker.md
says why the log is kept this way and what it costs."""

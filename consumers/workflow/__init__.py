"""Workflow manager: training triggers, promotion policy and rollback, all as events.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

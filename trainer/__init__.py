"""Model trainer: consumes training.requested, publishes training.started/progress/completed/failed.

Imports mlbus/ and schemas/ only; talks to other components through topics."""

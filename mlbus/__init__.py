"""mlbus: a deep-learning platform built as an event-driven system on a Kafka log."""

from __future__ import annotations

__version__ = "0.1.0"

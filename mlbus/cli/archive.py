"""CLI commands of the archive component (being written this session)."""

from __future__ import annotations

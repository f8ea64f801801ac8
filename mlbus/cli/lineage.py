"""CLI commands of the lineage component (being written this session)."""

from __future__ import annotations

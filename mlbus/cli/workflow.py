"""CLI commands of the workflow component (being written this session)."""

from __future__ import annotations

"""CLI commands of the streams component (being written this session)."""

from __future__ import annotations

"""CLI commands of the serving component (being written this session)."""

from __future__ import annotations

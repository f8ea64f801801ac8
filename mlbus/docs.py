"""Generated parts of the README, kept in step by a test: the configuration reference, built
from the settings model itself, and the service table, built from the service manifests
(mlbus/services.py). `python -m mlbus.docs` rewrites both between their markers; the topic
table is `make schemas`' business."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mlbus.schemas.catalog import TOPICS
from mlbus.services import SERVICES
from mlbus.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
SERVICES_BEGIN, SERVICES_END = "<!-- services:begin -->", "<!-- services:end -->"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if value in ("", None, [], {}):
        return "(empty)"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        env = f"{prefix}{name.upper()}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{env}__")
            continue
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env}` | {_default(field)} | {description} |")
    return rows


def settings_table() -> str:
    return "\n".join(
        ["| variable | default | meaning |", "| --- | --- | --- |", *_rows(Settings, "MLBUS_")]
    )


def _topics(names: tuple[str, ...]) -> str:
    """Topic names, compact: a whole family as `training.*`, part of one as
    `training.started/failed`, the whole catalog as "every contract topic"."""
    if set(names) == set(TOPICS):
        return "every contract topic"
    families: dict[str, list[str]] = {}
    for name in names:
        family, _, event = name.rpartition(".")
        families.setdefault(family, []).append(event)
    out = []
    for family, events in families.items():
        members = [t for t in TOPICS if t.rpartition(".")[0] == family]
        if len(members) > 1 and len(events) == len(members):
            out.append(f"`{family}.*`")
        else:
            out.append(f"`{family}.{'/'.join(events)}`")
    return ", ".join(out)


def services_table() -> str:
    rows = [
        "| service | folder | role | consumer group | reads | writes | /metrics |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cfg = Settings()
    for s in SERVICES:
        writes = _topics(s.writes) if s.writes else "—"
        if s.keeps:
            writes += f" ({s.keeps})"
        group = f"`{s.group_id()}`" if s.group else "—"
        metrics = f"`:{s.metrics.port_of(cfg)}{s.metrics.path}` (`{s.metrics.port}`)"
        rows.append(
            f"| `{s.name}` | `{s.folder}` | {s.role} | {group} | {_topics(s.reads)} | {writes} "
            f"| {metrics} |"
        )
    return "\n".join(rows)


def _between(text: str, begin: str, end: str, table: str) -> str:
    head, found, rest = text.partition(begin)
    if not found:
        return text
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def readme_with_settings(text: str) -> str:
    return _between(text, BEGIN, END, settings_table())


def readme_with_services(text: str) -> str:
    return _between(text, SERVICES_BEGIN, SERVICES_END, services_table())


def main() -> int:
    README.write_text(readme_with_services(readme_with_settings(README.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

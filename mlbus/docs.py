"""Generated parts of the README, kept in step by a test: the configuration reference, built
from the settings model itself (`python -m mlbus.docs` rewrites it between its markers; the
topic table is `make schemas`' business)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mlbus.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


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


def readme_with_settings(text: str) -> str:
    head, found, rest = text.partition(BEGIN)
    if not found:
        return text
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


def main() -> int:
    README.write_text(readme_with_settings(README.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

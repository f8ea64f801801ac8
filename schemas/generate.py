"""Generate the checked-in JSON Schemas of the contract from the payload models.

    python -m mlbus.schemas.generate           write schemas/json/ (refuses incompatible changes)
    python -m mlbus.schemas.generate --check   exit 1 if the files are stale or a change is breaking

`schemas/json/<topic>.v1.json` is the current schema of each topic; `schemas/asyncapi.yaml`
describes the topics as an AsyncAPI 3.0 document (schemas/asyncapi.py) that references them.
Every revision ever written is kept, append-only, in
`schemas/json/history/<topic>.v1/NNNN.json`; a change must be compatible with all of them
(schemas/compat.py), which is what a test holds the models to. A breaking change needs a
new major version (`.v2`) and a migration plan, not an edit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mlbus.schemas import asyncapi
from mlbus.schemas.catalog import CATALOG, EVENT_MODELS, TopicSpec
from mlbus.schemas.compat import incompatibilities
from mlbus.schemas.envelope import SCHEMA_MAJOR, dataschema_for

JSON_DIR = Path(__file__).resolve().parent / "json"
ASYNCAPI = Path(__file__).resolve().parent / "asyncapi.yaml"
README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- topics:begin -->", "<!-- topics:end -->"


def schema_of(spec: TopicSpec) -> dict[str, Any]:
    body = EVENT_MODELS[spec.name].model_json_schema()
    head = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": dataschema_for(spec.name),
        "title": f"{spec.name} (CloudEvent)",
        "description": (
            f"{spec.description}. Key: {spec.key or 'the original record key'}. "
            f"Published by: {spec.published_by}."
        ),
    }
    return head | {k: v for k, v in body.items() if k not in ("title", "description")}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def current_path(spec: TopicSpec) -> Path:
    return JSON_DIR / f"{spec.name}.v{SCHEMA_MAJOR}.json"


def history(spec: TopicSpec) -> list[Path]:
    return sorted((JSON_DIR / "history" / f"{spec.name}.v{SCHEMA_MAJOR}").glob("*.json"))


def problems(spec: TopicSpec) -> list[str]:
    """Why the checked-in files of `spec` do not match its model, or the model breaks one of
    its published revisions."""
    schema = schema_of(spec)
    found = []
    for revision in history(spec):
        for problem in incompatibilities(json.loads(revision.read_text()), schema):
            found.append(f"{spec.name}: breaks published revision {revision.name}: {problem}")
    path = current_path(spec)
    if not path.exists() or path.read_text() != render(schema):
        found.append(
            f"{spec.name}: {path.relative_to(JSON_DIR.parent.parent)} is out of date "
            f"(run `make schemas`)"
        )
    return found


def write(spec: TopicSpec) -> bool:
    """Write the current schema and a new history revision; False if nothing changed."""
    breaking = [p for p in problems(spec) if "breaks published" in p]
    if breaking:
        raise SystemExit("refusing an incompatible change:\n  " + "\n  ".join(breaking))
    text = render(schema_of(spec))
    path = current_path(spec)
    if path.exists() and path.read_text() == text:
        return False
    revisions = history(spec)
    folder = JSON_DIR / "history" / f"{spec.name}.v{SCHEMA_MAJOR}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{len(revisions) + 1:04d}.json").write_text(text)
    path.write_text(text)
    return True


def topic_table() -> str:
    """The contract as a Markdown table (the README embeds it between markers)."""

    def retention(ms: int) -> str:
        return "forever" if ms < 0 else f"{ms // 86_400_000} days"

    rows = [
        "| topic | key | partitions | retention | published by | meaning | schema |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in CATALOG:
        rows.append(
            f"| `{spec.name}` | {spec.key or 'original key'} | {spec.partitions} | "
            f"{retention(spec.retention_ms)} | {spec.published_by} | {spec.description} | "
            f"[json](schemas/json/{current_path(spec).name}) |"
        )
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    return f"{head}{TABLE_BEGIN}\n{topic_table()}\n{TABLE_END}{tail}"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = [p for spec in CATALOG for p in problems(spec)]
        if not ASYNCAPI.exists() or ASYNCAPI.read_text() != asyncapi.render():
            found.append("schemas/asyncapi.yaml is out of date (run `make schemas`)")
        for p in found:
            print(p)
        return 1 if found else 0
    JSON_DIR.mkdir(exist_ok=True)
    for spec in CATALOG:
        if write(spec):
            print(f"wrote {current_path(spec).name}")
    document = asyncapi.render()
    if not ASYNCAPI.exists() or ASYNCAPI.read_text() != document:
        ASYNCAPI.write_text(document)
        print(f"wrote {ASYNCAPI.name}")
    if README.exists() and TABLE_BEGIN in README.read_text():
        README.write_text(readme_with_table(README.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

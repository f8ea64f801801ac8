"""Backward compatibility of a published JSON Schema (the contract may only evolve
compatibly: add optional fields; never remove, retype, or make a field required).

Compatible here means both ways: a consumer built against the new schema reads events
written under the old one, and a consumer built against the old one reads events written
under the new one (it ignores the fields it does not know).
"""

from __future__ import annotations

from typing import Any

_DOC_KEYS = {"title", "description", "examples", "$id", "$schema", "$comment"}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline every local `$ref` (the contract has no recursive models)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
                return walk(merged)
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every change from `old` to `new` that breaks a reader; empty when compatible."""
    problems: list[str] = []
    _compare(resolve(old), resolve(new), "$", problems)
    return problems


def _compare(old: Any, new: Any, path: str, problems: list[str]) -> None:
    if not isinstance(old, dict) or not isinstance(new, dict):
        if old != new:
            problems.append(f"{path}: changed from {old!r} to {new!r}")
        return
    old = {k: v for k, v in old.items() if k not in _DOC_KEYS}
    new = {k: v for k, v in new.items() if k not in _DOC_KEYS}
    if "properties" in old or "properties" in new:
        _compare_object(old, new, path, problems)
        old = {k: v for k, v in old.items() if k not in ("properties", "required")}
        new = {k: v for k, v in new.items() if k not in ("properties", "required")}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if key in old or key in new:
            a, b = old.pop(key, []), new.pop(key, [])
            if len(a) != len(b):
                problems.append(f"{path}: {key} changed from {len(a)} to {len(b)} alternatives")
            else:
                for i, (x, y) in enumerate(zip(a, b, strict=True)):
                    _compare(x, y, f"{path}.{key}[{i}]", problems)
    for key in ("items", "additionalProperties"):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            _compare(old.pop(key), new.pop(key), f"{path}.{key}", problems)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            problems.append(f"{path}: {key} changed from {old.get(key)!r} to {new.get(key)!r}")


def _compare_object(
    old: dict[str, Any], new: dict[str, Any], path: str, problems: list[str]
) -> None:
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    for name in old_props:
        if name not in new_props:
            problems.append(f"{path}.{name}: field removed")
        else:
            _compare(old_props[name], new_props[name], f"{path}.{name}", problems)
    for name in sorted(new_required - old_required):
        problems.append(
            f"{path}.{name}: field became required"
            if name in old_props
            else f"{path}.{name}: new field is required (new fields must be optional)"
        )
    for name in sorted(old_required - new_required):
        if name in new_props:
            problems.append(f"{path}.{name}: required field became optional")

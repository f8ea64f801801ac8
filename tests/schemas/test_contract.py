"""The published contract: checked-in JSON Schemas equal the models, every change is
backward compatible with every published revision, and the catalog is consistent."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from mlbus.schemas.catalog import CATALOG, EVENT_MODELS, TOPICS
from mlbus.schemas.compat import incompatibilities
from mlbus.schemas.generate import current_path, history, problems, render, schema_of


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_checked_in_schema_matches_the_model(spec):
    path = current_path(spec)
    assert path.exists(), f"{path} missing: run `make schemas`"
    assert path.read_text() == render(schema_of(spec)), f"{path.name} is stale: run `make schemas`"


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_model_is_compatible_with_every_published_revision(spec):
    assert history(spec), f"{spec.name} has no published revision"
    assert problems(spec) == []


def test_every_topic_has_a_model_whose_type_is_its_name():
    assert set(EVENT_MODELS) == set(TOPICS)
    for spec in CATALOG:
        assert EVENT_MODELS[spec.name].model_fields["type"].annotation.__args__ == (spec.name,)
        if spec.key is not None:
            assert spec.key in spec.payload.model_fields, f"{spec.name}: key field {spec.key}"


def _schema(model: type[BaseModel]) -> dict:
    return json.loads(json.dumps(model.model_json_schema()))


class V1(BaseModel):
    name: str
    size: int
    note: str | None = None


class Nested(BaseModel):
    inner: V1


def test_adding_an_optional_field_is_compatible():
    class V2(V1):
        extra: str | None = None

    assert incompatibilities(_schema(V1), _schema(V2)) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("remove", "$.size: field removed"),
        ("retype", "$.size"),
        ("require", "$.extra: new field is required"),
        ("tighten", "$.note: field became required"),
        ("loosen", "$.name: required field became optional"),
    ],
)
def test_breaking_changes_are_detected(change, problem):
    if change == "remove":

        class V2(BaseModel):
            name: str
            note: str | None = None
    elif change == "retype":

        class V2(BaseModel):  # type: ignore[no-redef]
            name: str
            size: str
            note: str | None = None
    elif change == "require":

        class V2(V1):  # type: ignore[no-redef]
            extra: str
    elif change == "tighten":

        class V2(BaseModel):  # type: ignore[no-redef]
            name: str
            size: int
            note: str
    else:

        class V2(BaseModel):  # type: ignore[no-redef]
            name: str | None = None
            size: int
            note: str | None = None

    found = incompatibilities(_schema(V1), _schema(V2))
    assert any(problem in p for p in found), found


def test_nested_changes_are_followed_through_refs():
    class V1b(BaseModel):
        name: str
        note: str | None = None

    class NestedBroken(BaseModel):
        inner: V1b

    found = incompatibilities(_schema(Nested), _schema(NestedBroken))
    assert any("$.inner.size: field removed" in p for p in found), found


def test_generator_refuses_a_breaking_change(monkeypatch, tmp_path):
    import mlbus.schemas.generate as generate
    from mlbus.schemas.base import Payload
    from mlbus.schemas.catalog import TopicSpec

    class Old(Payload):
        model: str
        size: int

    class New(Payload):
        model: str

    monkeypatch.setattr(generate, "JSON_DIR", tmp_path)
    spec_old = TopicSpec("x.y", Old, "model", 1, "test", "test")
    monkeypatch.setitem(generate.EVENT_MODELS, "x.y", EVENT_MODELS["training.progress"])
    # Publish a revision by hand, then check a model that dropped a field against it.
    folder = tmp_path / "history" / "x.y.v1"
    folder.mkdir(parents=True)
    (folder / "0001.json").write_text(
        render({"properties": {"size": {"type": "integer"}}, "required": ["size"]})
    )
    found = problems(spec_old)
    assert any("breaks published revision 0001.json" in p for p in found), found
    with pytest.raises(SystemExit, match="refusing an incompatible change"):
        generate.write(spec_old)


def test_readme_topic_table_is_generated_from_the_catalog():
    from mlbus.schemas.generate import README, TABLE_BEGIN, readme_with_table

    text = README.read_text()
    assert TABLE_BEGIN in text
    assert readme_with_table(text) == text, "README topic table is stale: run `make schemas`"

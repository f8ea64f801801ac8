"""The one `name@version` resolver of the edges (mlbus/refs.py): parsing what users type,
and resolving a version prefix against the known versions, with errors that say what is
wrong (unknown name, unknown version, ambiguous prefix with its candidates, malformed)."""

from __future__ import annotations

import pytest

from mlbus.errors import Invalid, NotFound
from mlbus.refs import InvalidRef, Ref, parse, resolve, resolve_ref

KNOWN = ["9f2c01aa", "9f2c77bb", "a1b2c3d4"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits", Ref("digits")),
        ("digits@9f2c", Ref("digits", "9f2c")),
        ("digits@sha256:9f2c01aa", Ref("digits", "9f2c01aa")),
        (" digits@v1 ", Ref("digits", "v1")),
    ],
)
def test_parse(text: str, expected: Ref) -> None:
    assert parse(text) == expected
    assert str(expected) == text.strip().replace("sha256:", "")


@pytest.mark.parametrize("text", ["", "@v1", "digits@", "digits@sha256:", "a@b@c"])
def test_parse_refuses_malformed_text(text: str) -> None:
    with pytest.raises(InvalidRef, match=r"use MODEL\[@VERSION\]"):
        parse(text, what="MODEL")


def test_parse_can_require_a_version() -> None:
    with pytest.raises(InvalidRef, match="use DATASET@VERSION"):
        parse("digits", what="DATASET", need_version=True)


def test_an_exact_version_is_itself_even_when_it_prefixes_another() -> None:
    assert resolve("m", "v1", ["v1", "v10", "v11"]) == "v1"
    assert resolve("d", "sha256:a1b2c3d4", KNOWN) == "a1b2c3d4"


def test_a_unique_prefix_resolves_to_the_full_version() -> None:
    assert resolve("digits", "a1", KNOWN, kind="dataset") == "a1b2c3d4"
    assert resolve("digits", "9f2c7", KNOWN, kind="dataset") == "9f2c77bb"
    assert resolve_ref("digits@9f2c0", KNOWN) == Ref("digits", "9f2c01aa")
    assert resolve_ref(Ref("digits"), KNOWN) == Ref("digits")  # no version: left as it is


def test_an_ambiguous_prefix_lists_its_candidates() -> None:
    with pytest.raises(NotFound) as error:
        resolve("digits", "9f2c", KNOWN, kind="dataset")
    message = str(error.value)
    assert "ambiguous" in message and "9f2c01aa, 9f2c77bb" in message
    assert "a1b2c3d4" not in message


def test_an_unknown_version_or_name_says_which() -> None:
    with pytest.raises(NotFound, match="dataset digits@ff: no version 'ff'"):
        resolve("digits", "ff", KNOWN, kind="dataset")
    with pytest.raises(NotFound, match="no model named 'ghost'"):
        resolve("ghost", "v1", [], kind="model")


def test_many_candidates_are_cut_in_the_message() -> None:
    known = [f"ab{i:02d}" for i in range(12)]
    with pytest.raises(NotFound, match="ab00, ab01, ab02, ab03, ab04 and 7 more"):
        resolve("m", "ab", known)


def test_a_lookup_keeps_its_own_error_class() -> None:
    class UnknownThing(NotFound):
        pass

    for version, known in (("zz", KNOWN), ("9f2c", KNOWN), ("v1", [])):
        with pytest.raises(UnknownThing):
            resolve("thing", version, known, error=UnknownThing)
    assert issubclass(InvalidRef, Invalid) and InvalidRef.status == 400

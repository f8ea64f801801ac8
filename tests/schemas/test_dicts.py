"""`decode_dict` against `decode`: for every topic, the same records accepted with the same
values, and the same records refused with the same reason (differential test over a
generated log covering every topic and over every single-field mutation of its events)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, field_validator

from mlbus.errors import InvalidEvent
from mlbus.schemas import dicts
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import decode, decode_dict, dict_decoder, encode_new
from mlbus.schemas.search import SearchCompleted, SearchRequested, TrialPruned
from mlbus.schemas.serving import InferenceFeedback, ServingAccuracy
from mlbus.schemas.traffic import ModelTraffic
from tests.consumers.lineage.generator import GenRecord, generate_log

WRONG: list[Any] = [None, "", "x", -1, 0, 1.5, True, [], {}, ["x"], {"x": 1}, "2026-13-45"]


def outcome(fn: Any, value: bytes, topic: str) -> tuple[str, Any]:
    try:
        event = fn(value, expected_type=topic)
    except InvalidEvent as e:
        return "refused", e.reason
    return "accepted", event if isinstance(event, dict) else event.model_dump()


def bound(value: bytes, expected_type: str) -> dict[str, Any]:
    """`dict_decoder`, called as `decode_dict` is."""
    return dict_decoder(expected_type)(value)


def mutations(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every field of the envelope, of `data` and of objects nested one level in `data`:
    removed, and replaced by each wrong-ish value."""
    out = []

    def vary(path: tuple[str, ...]) -> None:
        for replacement in [*WRONG, "<drop>"]:
            copy = orjson.loads(orjson.dumps(document))
            target = copy
            for key in path[:-1]:
                target = target[key]
            if replacement == "<drop>":
                del target[path[-1]]
            else:
                target[path[-1]] = replacement
            out.append(copy)

    for key, value in document.items():
        vary((key,))
        if key == "data" and isinstance(value, dict):
            for inner, inner_value in value.items():
                vary(("data", inner))
                if isinstance(inner_value, dict):
                    for leaf in inner_value:
                        vary(("data", inner, leaf))
    return out


def feedback_records() -> list[GenRecord]:
    """The feedback topics (not in the lineage generator, whose log other tests pin)."""
    payloads = [
        InferenceFeedback(request_id="r1", model="m", label="cat"),
        InferenceFeedback(
            request_id="r2",
            model="m",
            label=2.5,
            known_at=datetime(2026, 3, 1, 12, tzinfo=UTC),
            version="v1",
        ),
        InferenceFeedback(request_id="r3", model="m", label=7),
        ServingAccuracy(
            model="m",
            version="v1",
            window_start=datetime(2026, 3, 1, 12, tzinfo=UTC),
            window_end=datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC),
            labelled=10,
            correct=8,
            accuracy=0.8,
            late=1,
            unmatched=2,
        ),
    ]
    out = []
    for payload in payloads:
        ref, value = encode_new(payload, source="tests")
        out.append(GenRecord(ref.type, ref.key.encode() if ref.key else None, value))
    return out


def search_records() -> list[GenRecord]:
    """A search, a prune decision and the search's end (the generated log has runs, not
    searches)."""
    search = SearchRequested.model_validate(
        {
            "search_id": "s1",
            "model": "m",
            "dataset": {"name": "d", "version": "v1"},
            "family": "mlp",
            "space": {
                "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
                "dropout": {"type": "categorical", "choices": [0.0, 0.1]},
            },
            "trials": 4,
            "parallel": 2,
            "timeout_seconds": 60.0,
        }
    )
    pruned = TrialPruned(
        search_id="s1", trial=1, model="m", run_id="r", request_id="q", epoch=2, pruner="median"
    )
    ended = SearchCompleted(
        search_id="s1", model="m", reason="timeout", trials=3, budget=4, completed=2,
        pruned=1, best_trial=0, best_run_id="r0", best_value=0.9,
    )  # fmt: skip
    out = []
    for payload in (search, pruned, ended):
        ref, value = encode_new(payload, source="tests")
        out.append(GenRecord(ref.type, ref.key.encode() if ref.key else None, value))
    return out


def traffic_records() -> list[GenRecord]:
    """A canary step and a shadow (the generated log has no rollout)."""
    canary = ModelTraffic.model_validate(
        {
            "model": "m",
            "rollout_id": "r1",
            "strategy": "canary",
            "status": "advanced",
            "stable": "1",
            "candidate": "2",
            "weights": {"1": 50, "2": 50},
            "step": 1,
            "steps": [10, 50, 100],
            "criteria": {"min_samples": 100},
            "analysis": {"verdict": "advance", "versions": {"2": {"requests": 120}}},
            "reason": "passed",
            "actor": "mlbus/workflow",
            "artifact": {"uri": "file:///m/2", "sha256": "sha256:" + "ab" * 32},
        }
    )
    shadow = canary.model_copy(
        update={"strategy": "shadow", "status": "started", "weights": {"1": 100}, "shadow": True}
    )
    out = []
    for payload in (canary, shadow):
        ref, value = encode_new(payload, source="tests")
        out.append(GenRecord(ref.type, ref.key.encode() if ref.key else None, value))
    return out


@pytest.fixture(scope="module")
def log() -> list[Any]:
    return generate_log(3000, seed=7) + feedback_records() + search_records() + traffic_records()


def test_the_generated_log_decodes_the_same_both_ways(log):
    seen: set[str] = set()
    for record in log:
        if record.topic not in TOPICS:
            continue
        seen.add(record.topic)
        expected = outcome(decode, record.value, record.topic)
        assert outcome(decode_dict, record.value, record.topic) == expected
        assert outcome(bound, record.value, record.topic) == expected
    assert seen == set(TOPICS)  # every topic of the contract was compared


def test_every_single_field_mutation_is_judged_the_same_both_ways(log):
    firsts: dict[str, bytes] = {}
    for record in log:
        new = record.topic in TOPICS and record.topic not in firsts
        if new and outcome(decode, record.value, record.topic)[0] == "accepted":
            firsts[record.topic] = record.value
    assert set(firsts) == set(TOPICS)
    compared = refused = 0
    for topic, value in firsts.items():
        for document in mutations(orjson.loads(value)):
            raw = orjson.dumps(document)
            expected = outcome(decode, raw, topic)
            assert outcome(decode_dict, raw, topic) == expected, (topic, document)
            assert outcome(bound, raw, topic) == expected, (topic, document)
            compared += 1
            refused += expected[0] == "refused"
    assert refused > compared / 3  # the mutations really exercise the refusals


def test_the_bound_decoder_refuses_what_decode_dict_refuses_before_parsing(log):
    value = next(r.value for r in log if r.topic == "inference.logged")
    one = dict_decoder("inference.logged", max_bytes=len(value))
    assert one(value) == decode_dict(value, expected_type="inference.logged")
    small = dict_decoder("inference.logged", max_bytes=len(value) - 1)
    with pytest.raises(InvalidEvent, match="over the"):
        small(value)
    with pytest.raises(InvalidEvent, match="tombstone"):
        one(None)
    with pytest.raises(InvalidEvent, match="unknown event type"):
        dict_decoder("no.such.topic")


def test_fields_left_out_take_the_models_defaults_and_the_dict_is_plain():
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": "e1",
            "source": "t",
            "type": "inference.logged",
            "data": {
                "request_id": "r",
                "model": "m",
                "version": "1",
                "replica": "a",
                "latency_seconds": 0.01,
            },
        }
    )
    event = decode_dict(value, expected_type="inference.logged")
    assert event == decode(value, expected_type="inference.logged").model_dump()
    assert event["data"]["ok"] is True and event["data"]["predictions"] == []
    assert type(event) is dict and event["time"] is None


def test_a_default_that_is_a_model_or_mutable_comes_as_a_fresh_plain_value():
    # pipeline.defined: `split` defaults to a Split(), `tags` to {}
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": "e1",
            "source": "t",
            "type": "pipeline.defined",
            "data": {
                "name": "p",
                "revision": 1,
                "dataset": "d",
                "model": "m",
                "family": "mlp",
                "policy": {"name": "default"},
                "actor": "a",
            },
        }
    )
    first = decode_dict(value, expected_type="pipeline.defined")
    second = decode_dict(value, expected_type="pipeline.defined")
    assert first == decode(value, expected_type="pipeline.defined").model_dump()
    assert type(first["data"]["split"]) is dict and type(first["data"]["policy"]) is dict
    first["data"]["tags"]["x"] = "y"
    first["data"]["split"]["test"] = 0.5
    assert second["data"]["tags"] == {} and second["data"]["split"]["test"] == 0.15


def test_a_model_with_a_custom_validator_has_no_dict_form():
    class Checked(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def positive(cls, v: int) -> int:
            return v

    with pytest.raises(TypeError, match="custom validators"):
        dicts.typed_dict(Checked)

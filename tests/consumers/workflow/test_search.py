"""A pipeline's `search:` block: checked like `mlbus tune` checks a search (naming the
line), and a new validated version of its dataset starts one `search.requested` (not runs),
which a restarted workflow does not publish again."""

from __future__ import annotations

import pytest

from mlbus.consumers.workflow.definitions import InvalidPipeline, parse
from tests.consumers.workflow.support import catch_up, define, pipeline_text, send, validated
from tests.mlbus.kafka.support import read_events

SEARCH = """\
search:
  trials: 6
  parallel: 2
  pruner: halving
  objective: {metric: validation.accuracy, direction: max}
  space:
    lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    dropout: {type: categorical, choices: [0.0, 0.2]}
"""


@pytest.mark.unit
def test_a_search_block_is_parsed_into_the_definition() -> None:
    defined = parse(pipeline_text(extra=SEARCH), source="p.yaml", actor="test")
    assert defined.search is not None and defined.search.trials == 6
    assert defined.search.space["lr"].log and defined.search.pruner == "halving"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (("trials: 6", "trials: 0"), "search.trials: a budget of at least one trial"),
        (("low: 1.0e-4", "low: 0.0"), "log scale needs low > 0"),
        (("lr: {type", "depth: {type"), "'depth' is not one of mlp's"),
        (("high: 1.0e-1", "high: 1.0e-5"), "above high"),
    ],
)
def test_a_bad_search_block_is_refused_naming_the_line(
    change: tuple[str, str], fragment: str
) -> None:
    text = pipeline_text(extra=SEARCH.replace(*change))
    with pytest.raises(InvalidPipeline, match=fragment) as raised:
        parse(text, source="p.yaml", actor="test")
    assert "p.yaml line " in str(raised.value)


@pytest.mark.integration
def test_a_new_version_starts_one_search_and_a_restart_starts_no_other(kafka, group) -> None:
    define(kafka, pipeline_text(extra=SEARCH))
    send(kafka, validated("iris", "v1"))
    catch_up(kafka, group)
    (search,) = read_events(kafka, "search.requested")
    s = search.data
    assert (s.pipeline, s.model, s.dataset.version, s.trials, s.parallel) == (
        "p1",
        "m1",
        "v1",
        6,
        2,
    )
    assert s.hyperparameters == {"hidden": 32} and search.id == s.search_id
    assert read_events(kafka, "training.requested") == []  # the tuning service's to request
    catch_up(kafka, group + "-again")  # a rebuild from the whole log
    assert len(read_events(kafka, "search.requested")) == 1

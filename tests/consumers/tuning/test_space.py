"""Search spaces and budgets refused before anything is published (mlbus/search.py and
`mlbus tune`), and the study rebuilt from the log's state asking the same next trial."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mlbus.consumers.tuning.state import Book
from mlbus.consumers.tuning.study import propose, should_prune
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import wrap
from mlbus.schemas.search import SearchRequested
from mlbus.schemas.training import (
    SearchTrial,
    TrainingCompleted,
    TrainingProgress,
    TrainingRequested,
)
from mlbus.search import InvalidSearch, check_search, grid, parse_space, trial_request_id
from tests.mlbus.test_cli import clean_env, mlbus, one_line_error

pytestmark = pytest.mark.unit

SPACE = """\
lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
hidden: {type: int, low: 8, high: 32}
dropout: {type: categorical, choices: [0.0, 0.1, 0.3]}
"""


def search(space: str = SPACE, **changes: object) -> SearchRequested:
    fields: dict[str, object] = {
        "search_id": "s1",
        "model": "m",
        "dataset": DatasetRef(name="d", version="v"),
        "family": "mlp",
        "space": parse_space(space),
        "trials": 8,
    }
    return SearchRequested.model_validate(fields | changes)


def test_a_valid_space_passes_and_keeps_its_types() -> None:
    s = search()
    check_search(s)
    assert s.space["lr"].log and s.space["hidden"].type == "int"
    assert s.space["dropout"].choices == [0.0, 0.1, 0.3]


@pytest.mark.parametrize(
    ("space", "fragment"),
    [
        ("{}", "empty"),
        ("lr: {type: float, low: 0.1, high: 0.01}", "above high"),
        ("lr: {type: float, low: 0.0, high: 0.1, log: true}", "log scale needs low > 0"),
        ("lr: {type: float, low: -1.0, high: 0.1, log: true}", "log scale needs low > 0"),
        ("widgets: {type: int, low: 1, high: 4}", "'widgets' is not one of mlp's"),
        ("dropout: {type: categorical, choices: []}", "non-empty list of choices"),
        ("lr: {type: float, low: 0.1}", "needs both low and high"),
        ("lr: {type: float, low: 1.0e-4, high: 5.0}", "out of range"),
        ("lr: {type: normal, low: 0.1, high: 0.2}", "space.lr.type"),
    ],
)
def test_a_space_that_can_never_be_sampled_is_refused_with_its_reason(
    space: str, fragment: str
) -> None:
    with pytest.raises(InvalidSearch, match=fragment):
        check_search(search(space))


def test_a_searched_name_cannot_also_be_fixed() -> None:
    with pytest.raises(InvalidSearch, match="both searched and fixed"):
        check_search(search(hyperparameters={"lr": 0.01}))


def test_a_grid_needs_a_step_for_a_float_range() -> None:
    with pytest.raises(InvalidSearch, match="needs a step"):
        check_search(search(sampler="grid"))
    axes = grid(parse_space("hidden: {type: int, low: 8, high: 32, step: 8}"))
    assert axes == {"hidden": [8, 16, 24, 32]}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--trials", "0"], "budget of zero"),
        (["--pruner", "asha"], "--pruner 'asha'"),
        (["--sampler", "cmaes"], "--sampler 'cmaes'"),
    ],
)
def test_tune_refuses_bad_options_before_it_looks_for_a_broker(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    # No broker anywhere: an error about Kafka would mean the check came too late.
    env = clean_env(MLBUS_DATA_DIR=str(tmp_path / "data"))
    result = mlbus("tune", "m", "--dataset", "d@v", "--space", str(space), *args, env=env)
    assert result.returncode != 0
    one_line_error(result, fragment)


def test_tune_refuses_a_contradictory_space_file(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.5, high: 0.1}\n")
    env = clean_env(MLBUS_DATA_DIR=str(tmp_path / "data"))
    result = mlbus("tune", "m", "--dataset", "d@v", "--space", str(space), env=env)
    one_line_error(result, "low (0.5) is above high (0.1)")


def _fold(book: Book, s: SearchRequested, trials: list[tuple[dict, list[float], bool]]) -> None:
    book.apply(wrap(s, source="t", event_id=s.search_id))
    for n, (params, values, done) in enumerate(trials):
        rid = trial_request_id(s.search_id, n)
        request = TrainingRequested(
            model="m", dataset=s.dataset, family="mlp", hyperparameters=params,
            trial=SearchTrial(search_id=s.search_id, number=n),
        )  # fmt: skip
        book.apply(wrap(request, source="t", event_id=rid))
        run = book.searches[s.search_id].trials[n].run_id
        for epoch, value in enumerate(values, 1):
            progress = TrainingProgress(
                run_id=run, model="m", epoch=epoch, max_epochs=4,
                metrics={"validation.accuracy": value}, samples_per_second=1.0,
            )  # fmt: skip
            book.apply(wrap(progress, source="t"))
        if done:
            completed = TrainingCompleted.model_validate(
                {
                    "run_id": run, "model": "m", "version": run[:12], "request_id": rid,
                    "family": "mlp", "dataset": s.dataset.model_dump(),
                    "artifact": {"uri": "file:///x", "sha256": "sha256:" + "ab" * 32},
                    "metrics": {"validation": {"accuracy": values[-1]}}, "epochs": len(values),
                    "code": {"package_version": "0"}, "duration_seconds": 1.0,
                }
            )  # fmt: skip
            book.apply(wrap(completed, source="t"))


def test_the_rebuilt_study_asks_the_same_trial_and_prunes_a_laggard() -> None:
    s = search(pruner="median", trials=10)
    history = [
        ({"lr": 0.01, "hidden": 16, "dropout": 0.0}, [0.8, 0.9, 0.92, 0.95], True),
        ({"lr": 0.02, "hidden": 24, "dropout": 0.1}, [0.82, 0.91, 0.93, 0.96], True),
        ({"lr": 0.005, "hidden": 32, "dropout": 0.0}, [0.78, 0.88, 0.9, 0.94], True),
        ({"lr": 0.0001, "hidden": 8, "dropout": 0.3}, [0.1, 0.12], False),
    ]
    first, second = Book(), Book()
    _fold(first, s, history)
    _fold(second, s, history)  # a restart replays the same log
    a, b = first.searches["s1"], second.searches["s1"]
    assert propose(a) == propose(b)  # same log, same next trial
    laggard = a.trials[3]
    assert should_prune(a, laggard, 2)
    assert not should_prune(a, laggard, 1)  # never on the first epoch
    assert not should_prune(a, a.trials[1], 2)
    summary = first.summary("s1", datetime.now(UTC))
    assert summary is not None and summary["best"]["trial"] == 1
    assert summary["counts"] == {
        "requested": 4, "running": 1, "completed": 3, "pruned": 0, "failed": 0,
    }  # fmt: skip


class _Kept:
    """The tuning service's producer in a unit test: what it publishes is kept."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, event: object) -> None:
        self.sent.append(event)

    def flush(self, timeout: float | None = None) -> int:
        return 0


def test_a_search_of_a_plugin_family_records_its_origin_and_each_trial_carries_it() -> None:
    from mlbus.consumers.tuning.service import TuningService
    from mlbus.families import resolve
    from mlbus.kafka.config import KafkaConfig

    s = search("width: {type: int, low: 4, high: 8}", family="resnet", trials=2, parallel=2)
    origin = check_search(s)
    assert origin is not None and origin == resolve("resnet").origin
    assert origin.distribution == "mlbus-resnet-family"
    assert check_search(search()) is None  # a built-in family has no origin

    service = TuningService(KafkaConfig(bootstrap="127.0.0.1:9"))
    kept = _Kept()
    service._producer = kept  # type: ignore[assignment]  # decisions only, no broker
    recorded = s.model_copy(update={"family_origin": origin})
    service.book.apply(wrap(recorded, source="t", event_id=s.search_id))
    service.step()
    requests = [e.data for e in kept.sent]
    assert len(requests) == 2
    assert all(isinstance(r, TrainingRequested) and r.family_origin == origin for r in requests)

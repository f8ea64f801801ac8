"""The feedback join (pure): feedback meets its logged prediction whichever comes first, and
what cannot be joined is counted, never dropped: known later than the horizon (late), for a
window already closed (late, in the next one), an unknown request id (unmatched), a label
that does not fit the prediction (mismatched), a second label for one request (duplicates).
Regression values give RMSE."""

from __future__ import annotations

from datetime import UTC, datetime

from mlbus.schemas.serving import InferenceFeedback, InferenceLogged, ServingAccuracy
from mlbus.streams.alerts import Thresholds
from mlbus.streams.feedback import FeedbackConfig, FeedbackJoin

T = Thresholds(windows=3, max_error_rate=0.05, max_latency_p99_seconds=0.5, max_psi=0.2)
BASE = 1_767_225_600_000


def join() -> FeedbackJoin:
    return FeedbackJoin(FeedbackConfig(1000, 100, 60_000, 1000, T))


def logged(rid: str, prediction: object, version: str = "v1") -> InferenceLogged:
    return InferenceLogged(
        request_id=rid,
        model="m",
        version=version,
        replica="r",
        latency_seconds=0.01,
        predictions=[prediction],  # type: ignore[list-item]  # each test's label type
    )


def feedback(rid: str, label: object, known_ms: int | None = None) -> InferenceFeedback:
    known = datetime.fromtimestamp(known_ms / 1000, UTC) if known_ms is not None else None
    return InferenceFeedback(request_id=rid, model="m", label=label, known_at=known)  # type: ignore[arg-type]  # each test's label type


def windows(j: FeedbackJoin) -> list[ServingAccuracy]:
    return [p for p, _, _ in j.outbox if isinstance(p, ServingAccuracy)]


def test_joined_either_way_round_and_everything_else_counted():
    j = join()
    j.apply("inference.logged", logged("a", "1"), BASE + 10)
    j.apply("inference.logged", logged("b", "2"), BASE + 20)
    j.apply("inference.logged", logged("c", "2"), BASE + 30)
    j.apply("inference.logged", logged("g", "1"), BASE + 40)
    j.apply("inference.feedback", feedback("a", 1), BASE + 100)  # right
    j.apply("inference.feedback", feedback("b", 1), BASE + 110)  # wrong
    j.apply("inference.feedback", feedback("c", 2, known_ms=BASE + 90_000), BASE + 120)  # late
    j.apply("inference.feedback", feedback("d", 2), BASE + 130)  # before its prediction
    j.apply("inference.feedback", feedback("zz", 2), BASE + 140)  # never logged
    j.apply("inference.feedback", feedback("a", 2), BASE + 150)  # a second opinion
    j.apply("inference.feedback", feedback("g", 1.5), BASE + 160)  # not a class
    j.apply("inference.logged", logged("d", "2"), BASE + 200)
    j.apply("inference.logged", logged("e", "0"), BASE + 1500)
    j.apply("inference.feedback", feedback("e", 0), BASE + 1600)
    # The first window has closed: both topics' stream time passed its end + grace.
    by_version = {x.version: x for x in windows(j)}
    w = by_version["v1"]
    assert (w.labelled, w.correct, w.accuracy, w.late, w.mismatched) == (3, 2, 2 / 3, 1, 1)
    assert w.duplicates == 1
    # The id never logged: unmatched once the inference log passed it, under no version.
    assert (by_version["unknown"].unmatched, by_version["unknown"].labelled) == (1, 0)
    j.idle(BASE + 10_000)
    # Feedback for a window already closed: late, in the version's next window.
    j.apply("inference.logged", logged("f", "0"), BASE + 11_000)
    j.apply("inference.feedback", feedback("f", 0), BASE + 500)
    j.apply("inference.feedback", feedback("e", 0), BASE + 11_100)
    j.idle(BASE + 20_000)
    assert windows(j)[-1].late == 1


def test_regression_values_give_rmse():
    j = join()
    for i, (prediction, truth) in enumerate([(1.0, 2.0), (3.0, 3.0), (0.5, 1.5)]):
        j.apply("inference.logged", logged(f"r{i}", prediction), BASE + i)
        j.apply("inference.feedback", feedback(f"r{i}", truth), BASE + 10 + i)
    j.idle(BASE + 5000)
    (w,) = windows(j)
    assert w.labelled == 3 and w.accuracy is None
    assert abs(w.rmse - (2 / 3) ** 0.5) < 1e-9


def test_a_shadow_answer_is_joined_under_its_own_version_beside_the_one_returned():
    j = join()
    j.apply("inference.logged", logged("a", "1"), BASE + 10)
    shadow = logged("a", "2", version="v2").model_copy(update={"shadow": True})
    j.apply("inference.logged", shadow, BASE + 11)
    j.apply("inference.feedback", feedback("b", 2), BASE + 15)  # before both its records
    j.apply("inference.logged", logged("b", "2"), BASE + 20)
    j.apply(
        "inference.logged",
        logged("b", "2", version="v2").model_copy(update={"shadow": True}),
        BASE + 21,
    )
    j.apply("inference.feedback", feedback("a", 1), BASE + 100)
    j.apply("inference.logged", logged("z", "0"), BASE + 1500)
    j.apply("inference.feedback", feedback("z", 0), BASE + 1600)
    by_version = {x.version: x for x in windows(j) if x.window_start.timestamp() * 1000 == BASE}
    assert (by_version["v1"].labelled, by_version["v1"].correct) == (2, 2)
    assert (by_version["v2"].labelled, by_version["v2"].correct) == (2, 1)
    assert by_version["v1"].duplicates == by_version["v2"].duplicates == 0

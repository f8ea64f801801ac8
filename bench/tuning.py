"""Hyperparameter search: TPE with median pruning against a full grid, on the same space,
both run by mlbus itself in one process on one embedded broker.

    .venv/bin/python bench/tuning.py [--epochs E] [--seed S] [--out bench/results/tuning.txt]

The digits sample (1,797 8x8 images) with the `mlp` family; the space is discrete so that
the grid covers it exactly: lr in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}, hidden in {16, 32, 48, 64},
dropout in {0.0, 0.2} (40 points). Both searches go through the whole platform: a
`search.requested` to the tuning service (consumers/tuning), trials as `training.requested`
to a training worker, epochs as `training.progress`, prune decisions as `search.pruned`.

1. baseline  the grid sampler, no pruner: every point trained for E epochs.
2. mlbus     TPE + median pruning with the same budget (as many trials as the grid has
             points, E epochs each at most).

Compute is counted in epochs (the `training.progress` events of each trial, so a pruned
trial counts the epochs it trained). Each curve is the best validation accuracy of a
completed trial so far against the cumulative epochs, in the order the trials finished.
The figure: the epochs TPE + pruning needed to first reach the grid's best validation
accuracy, as a fraction of the grid's epochs (target <= 40 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlbus.broker import EmbeddedBroker
from mlbus.consumers.tuning.service import TuningService
from mlbus.consumers.tuning.state import READS, Book
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.search import Objective, SearchRequested
from mlbus.search import parse_space
from mlbus.storage import ObjectStore

SPACE = """\
lr: {type: categorical, choices: [0.0003, 0.001, 0.003, 0.01, 0.03]}
hidden: {type: int, low: 16, high: 64, step: 16}
dropout: {type: categorical, choices: [0.0, 0.2]}
"""
POINTS = 40


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def curve(kafka: KafkaConfig, search_id: str) -> list[tuple[int, float | None, str]]:
    """(cumulative epochs, best validation accuracy so far, trial outcome) per finished trial,
    in the order the outcomes are on the log."""
    book = Book()
    with LogView(kafka, READS, name="bench curve") as view:
        items = view.catch_up(timeout=120)
    items.sort(key=lambda i: (i.event.type != "search.requested", i.event.time))
    finished: list[tuple[Any, int]] = []  # (outcome time, trial number)
    for item in items:
        book.apply(item.event)
        if item.event.type in ("training.completed", "training.failed"):
            where = book.runs.get(item.event.data.run_id)
            if where is not None and where[0] == search_id:
                finished.append((item.event.time, where[1]))
    search = book.searches[search_id]
    points, used, best = [], 0, None
    for _, number in sorted(finished):
        trial = search.trials[number]
        used += len(trial.values)  # the epochs it reported: a pruned one stopped early
        if trial.outcome == "completed" and trial.value is not None:
            best = trial.value if best is None else max(best, trial.value)
        points.append((used, best, trial.outcome))
    return points


def run_search(
    kafka: KafkaConfig, service: TuningService, request: SearchRequested, timeout: float
) -> list[tuple[int, float | None, str]]:
    with EventProducer(kafka, source="bench") as producer:
        producer.publish(request, event_id=request.search_id)
        producer.flush()
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        search = service.book.searches.get(request.search_id)
        if search is not None and search.finished(datetime.now(UTC)):
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"search {request.search_id} did not finish within {timeout:.0f}s")
    time.sleep(1.0)
    return curve(kafka, request.search_id)


def first_reaching(points: list[tuple[int, float | None, str]], target: float) -> int | None:
    return next((used for used, best, _ in points if best is not None and best >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.datasets.samples import sample_table
    from mlbus.datasets.sources import from_table
    from mlbus.datasets.validator import Validator
    from mlbus.trainer.worker import TrainingWorker

    with tempfile.TemporaryDirectory(prefix="mlbus-bench-tuning-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(Path(tmp) / "broker", record=False))
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        apply_topics(kafka)
        store = ObjectStore((Path(tmp) / "objects").as_uri())
        producer = stack.enter_context(EventProducer(kafka, source="mlbus/trainer"))
        loops: list[ConsumerLoop] = []
        validator = ConsumerLoop(
            kafka, group="bench-validator", name="validator",
            handlers={"dataset.created": Validator(store, producer)},
        )  # fmt: skip
        worker = stack.enter_context(closing(TrainingWorker(kafka, store, producer)))
        trainer = ConsumerLoop(
            kafka, group="bench-trainer", name="trainer", long_running=True,
            handlers={"training.requested": worker},
        )  # fmt: skip
        service = TuningService(kafka)
        threads = [
            threading.Thread(target=loop.run, kwargs={"install_signal_handlers": False})
            for loop in (validator, trainer)
        ] + [threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})]
        loops += [validator, trainer]
        for thread in threads:
            thread.start()
        try:
            with DatasetRegistry(store, kafka) as registry:
                digits = registry.register(
                    from_table(sample_table("digits")), name="digits", label="label"
                )
            ref = DatasetRef(name="digits", version=digits.version)
            space = parse_space(SPACE)

            def request(name: str, sampler: str, pruner: str) -> SearchRequested:
                return SearchRequested.model_validate(
                    {
                        "search_id": f"bench-{name}", "model": f"digits-{name}", "dataset": ref,
                        "family": "mlp", "space": space, "sampler": sampler, "pruner": pruner,
                        "objective": Objective(), "trials": POINTS, "parallel": 1,
                        "seed": args.seed, "max_epochs": args.epochs,
                    }
                )  # fmt: skip

            log(f"grid: {POINTS} points x {args.epochs} epochs")
            t0 = time.perf_counter()
            grid = run_search(kafka, service, request("grid", "grid", "none"), args.timeout)
            grid_seconds = time.perf_counter() - t0
            log(f"grid done in {grid_seconds:.0f}s; TPE + median pruning, same budget")
            t0 = time.perf_counter()
            tpe = run_search(kafka, service, request("tpe", "tpe", "median"), args.timeout)
            tpe_seconds = time.perf_counter() - t0
        finally:
            service.stop()
            for loop in loops:
                loop.stop()
            for thread in threads:
                thread.join(60)

    grid_epochs, grid_best = grid[-1][0], max(b for _, b, _ in grid if b is not None)
    tpe_epochs = tpe[-1][0]
    tpe_best = max((b for _, b, _ in tpe if b is not None), default=None)
    reached = first_reaching(tpe, grid_best)
    pruned = sum(outcome == "pruned" for _, _, outcome in tpe)
    lines = [
        f"bench/tuning.py  digits, mlp, {POINTS}-point space, max {args.epochs} epochs/trial, "
        f"seed {args.seed}",
        "",
        f"baseline  grid (no pruning): {len(grid)} trials, {grid_epochs} epochs, "
        f"best validation accuracy {grid_best:.4f}, {grid_seconds:.0f}s",
        f"mlbus     TPE + median:      {len(tpe)} trials ({pruned} pruned), {tpe_epochs} epochs, "
        f"best validation accuracy {tpe_best if tpe_best is None else f'{tpe_best:.4f}'}, "
        f"{tpe_seconds:.0f}s",
        "",
    ]
    if reached is None:
        lines.append(f"TPE + pruning never reached the grid's best ({grid_best:.4f})  FAIL")
    else:
        ratio = reached / grid_epochs
        verdict = "ok" if ratio <= 0.40 else "FAIL"
        lines.append(
            f"epochs to reach the grid's best {grid_best:.4f}: TPE + pruning {reached} of the "
            f"grid's {grid_epochs} = {ratio:.1%} (target <= 40%)  {verdict}"
        )
    lines += ["", "curves: cumulative epochs -> best validation accuracy so far"]
    for name, points in (("grid", grid), ("tpe+median", tpe)):
        text = ", ".join(
            f"{used}:{'-' if best is None else f'{best:.4f}'}" for used, best, _ in points
        )
        lines.append(f"{name:>11}  {text}")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        args.out.write_text(f"# measured {stamp}\n{report}\n")


if __name__ == "__main__":
    main()

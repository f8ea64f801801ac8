"""Hyperparameter search: TPE with pruning against a full grid on the same space, counted in
epochs (the compute a search spends).

    .venv/bin/python bench/tuning.py [--seeds N] [--epochs E] [--rows R] [--table FILE]
                                     [--platform N] [--out bench/results/tuning.txt]

Task: a generated 5-class problem (scikit-learn `make_classification`: R rows, 40 features
of which 12 informative and 8 redundant, 3 clusters per class, 2 % flipped labels; nothing
is downloaded), split 70/15/15, so the validation set has 0.15·R rows (3,000 by default:
one row is 0.03 pp). Family `mlp` (2 layers, dropout 0.1, Adam, batch 64). The space is
discrete so the grid covers it exactly, and wide enough that most of it is poor (a learning
rate of 0.1 does not learn, 1e-4 learns slowly, a weight decay of 0.1 stops it):

    lr            {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1}
    hidden        {16, 64, 256}
    weight_decay  {0, 1e-3, 1e-2, 1e-1}          84 points, E epochs each (default 12)

1. The table. Every grid point is trained once for E epochs by the trainer's own training
   loop (`mlbus.trainer.training.fit`, what the training worker runs, seed 0) and its
   validation accuracy after every epoch recorded. Training is deterministic on CPU for a
   seed, so this is exactly what any trial with those parameters reports on the log.
2. The searches, driven by the tuning service's own decision code: a `TuningService` whose
   events are folded into its state instead of going through a broker. It asks each trial
   (`training.requested`, Optuna's sampler rebuilt from the state as in `mlbus run tuning`),
   the table answers each epoch as a `training.progress`, the service judges every epoch
   with its pruner (`search.pruned`), and a trial ends with `training.completed`, or a
   `training.failed` saying pruned at the epoch of the decision. One trial at a time
   (parallel 1), so a pruned trial stops right at the epoch decided.
     baseline  grid sampler, no pruner: the 84 points in the service's shuffled order
     mlbus     TPE + median pruner, and TPE + successive halving: 84 trials at most
   Each search id seeds the samplers (and the grid's order), so seeds 0..N-1 are N
   independent searches on the same table.

`--platform N` also runs the TPE + median searches of seeds 0..N-1 through the whole
platform (embedded broker, tuning service, training worker, validator), each beside its
replay (seed 0's curve too): there the trainer checks for a prune decision between epochs,
so a pruned trial can train an epoch past the decision.

The figure: the cumulative epochs a search needed until a completed trial first reached the
grid's best validation accuracy, as a fraction of the grid's epochs (target <= 40 %).
Curves: best completed validation accuracy so far against cumulative epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mlbus.consumers.tuning.service import TuningService
from mlbus.consumers.tuning.state import READS, Book
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event
from mlbus.schemas.search import Objective, SearchRequested
from mlbus.schemas.training import (
    Artifact,
    CodeVersion,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
)
from mlbus.search import grid, parse_space

SPACE = """\
lr: {type: categorical, choices: [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1]}
hidden: {type: categorical, choices: [16, 64, 256]}
weight_decay: {type: categorical, choices: [0.0, 0.001, 0.01, 0.1]}
"""
FEATURES = 40
METRIC = "validation.accuracy"
TARGET = 0.40

Point = tuple[int, float | None, str]  # cumulative epochs, best so far, the trial's outcome


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def key_of(params: dict[str, Any]) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


def dataset(rows: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=FEATURES,
        n_informative=12,
        n_redundant=8,
        n_classes=5,
        n_clusters_per_class=3,
        class_sep=0.8,
        flip_y=0.02,
        random_state=0,
    )
    return x.astype(np.float32), y.astype(np.int64)


# -- 1. the table ----------------------------------------------------------------------------


def build_table(rows: int, epochs: int) -> tuple[dict[str, list[float]], float]:
    """Every grid point's validation accuracy per epoch, and the CPU seconds it took."""
    import torch

    from mlbus.families import hyperparameters
    from mlbus.trainer.data import prepare
    from mlbus.trainer.training import fit

    torch.set_num_threads(1)
    x, y = dataset(rows)
    names = [f"f{i}" for i in range(FEATURES)]
    prepared = prepare(
        x, y, features=names, label="label", seed=0, validation=0.15, test=0.15
    )  # what the worker does with a request's default split and seed 0
    axes = grid(parse_space(SPACE))
    points = [dict(zip(axes, values, strict=True)) for values in _product(list(axes.values()))]
    table: dict[str, list[float]] = {}
    started = time.process_time()
    for i, point in enumerate(points):
        curve: list[float] = []

        def record(_epoch: int, metrics: dict[str, float], _rate: float, curve=curve) -> None:
            curve.append(metrics[METRIC])

        fit(prepared, "mlp", hyperparameters("mlp", point), max_epochs=epochs, seed=0,
            on_epoch=record)  # fmt: skip
        table[key_of(point)] = curve
        log(f"table {i + 1}/{len(points)} {point}: {curve[-1]:.4f}")
    return table, time.process_time() - started


def _product(axes: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for axis in axes:
        out = [(*head, v) for head in out for v in axis]
    return out


# -- 2. the searches, on the tuning service's decision code ---------------------------------


class Folded:
    """The service's producer here: what it publishes is kept, and the service folds it
    into its state itself (as it does with what it publishes on a broker)."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    def send(self, event: Event) -> None:
        self.sent.append(event)

    def flush(self, timeout: float | None = None) -> int:
        return 0


@dataclass
class Searched:
    name: str
    seed: int
    curve: list[Point]
    trials: int
    pruned: int

    @property
    def epochs(self) -> int:
        return self.curve[-1][0] if self.curve else 0

    @property
    def best(self) -> float | None:
        return max((b for _, b, _ in self.curve if b is not None), default=None)

    def reaching(self, target: float) -> int | None:
        return next((e for e, b, _ in self.curve if b is not None and b >= target), None)


def request(
    name: str, sampler: str, pruner: str, seed: int, epochs: int, trials: int, ref: DatasetRef
) -> SearchRequested:
    return SearchRequested(
        search_id=f"bench-{name}-{seed}",
        model=f"bench-{name}",
        dataset=ref,
        family="mlp",
        space=parse_space(SPACE),
        sampler=sampler,  # type: ignore[arg-type]  # one of the literals, from the caller
        pruner=pruner,  # type: ignore[arg-type]
        objective=Objective(metric=METRIC),
        trials=trials,
        parallel=1,
        seed=0,  # the training seed (the table's); the search id seeds the sampler
        max_epochs=epochs,
    )


def replay(r: SearchRequested, table: dict[str, list[float]], name: str, seed: int) -> Searched:
    service = TuningService(KafkaConfig(bootstrap="unused:9092"), source="bench/tuning")
    service._producer = Folded()  # type: ignore[assignment]  # decisions only, no broker
    book = service.book
    requested = wrap(r, source="bench", event_id=r.search_id)
    book.apply(requested)
    search = book.searches[r.search_id]
    now = datetime.now(UTC)

    def emit(data: Any) -> None:
        book.apply(wrap(data, source="bench/trainer", causation=requested))

    curve: list[Point] = []
    used, best = 0, None
    while True:
        service.step(now)
        running = search.running()
        if not running:
            break
        trial = running[0]
        values = table[key_of(trial.params)]
        assert trial.request_id is not None
        for epoch in range(1, r.max_epochs + 1):
            emit(
                TrainingProgress(
                    run_id=trial.run_id, model=r.model, epoch=epoch, max_epochs=r.max_epochs,
                    metrics={METRIC: values[epoch - 1]}, samples_per_second=0.0,
                )
            )  # fmt: skip
            service.step(now)  # judges the epoch (a pruned trial gets its search.pruned)
            if trial.pruned_at is not None:
                emit(
                    TrainingFailed(
                        run_id=trial.run_id, model=r.model, request_id=trial.request_id,
                        reason="pruned", retryable=False, error_type="Pruned",
                        epoch=epoch, pruned=True,
                    )
                )  # fmt: skip
                break
        else:
            emit(
                TrainingCompleted(
                    run_id=trial.run_id, model=r.model, version=trial.run_id,
                    request_id=trial.request_id, family=r.family, dataset=r.dataset,
                    artifact=Artifact(uri="memory://none", sha256="sha256:" + "0" * 64),
                    metrics={"validation": {"accuracy": values[-1]}},
                    hyperparameters=trial.params, epochs=r.max_epochs,
                    code=CodeVersion(package_version="bench"), duration_seconds=0.0,
                )
            )  # fmt: skip
        used += len(trial.values)
        if trial.outcome == "completed" and trial.value is not None:
            best = trial.value if best is None else max(best, trial.value)
        curve.append((used, best, trial.outcome))
    counts = search.counts()
    return Searched(name, seed, curve, counts["requested"], counts["pruned"])


# -- the whole platform (--platform N) -------------------------------------------------------


def platform_search(r: SearchRequested, rows: int, timeout: float, seed: int) -> Searched:
    """One search on an embedded broker with the tuning service and a training worker."""
    import pyarrow as pa

    from mlbus.broker import EmbeddedBroker
    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.datasets.sources import from_table
    from mlbus.datasets.validator import Validator
    from mlbus.kafka.admin import apply_topics
    from mlbus.kafka.consumer import ConsumerLoop
    from mlbus.kafka.logview import LogView
    from mlbus.kafka.producer import EventProducer
    from mlbus.storage import ObjectStore
    from mlbus.trainer.worker import TrainingWorker

    x, y = dataset(rows)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(FEATURES)}, "label": y})
    with tempfile.TemporaryDirectory(prefix="mlbus-bench-tuning-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(Path(tmp) / "broker", record=False))
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        apply_topics(kafka)
        store = ObjectStore((Path(tmp) / "objects").as_uri())
        producer = stack.enter_context(EventProducer(kafka, source="mlbus/trainer"))
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
        runners: list[Callable[..., object]] = [validator.run, trainer.run, service.run]
        threads = [
            threading.Thread(target=run, kwargs={"install_signal_handlers": False})
            for run in runners
        ]
        for thread in threads:
            thread.start()
        try:
            with DatasetRegistry(store, kafka) as registry:
                data = registry.register(from_table(table), name="generated", label="label")
            r = r.model_copy(update={"dataset": DatasetRef(name="generated", version=data.version)})
            with EventProducer(kafka, source="bench") as out:
                out.publish(r, event_id=r.search_id)
                out.flush()
            started = time.monotonic()
            while time.monotonic() - started < timeout:
                search = service.book.searches.get(r.search_id)
                if search is not None and search.finished(datetime.now(UTC)):
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"search {r.search_id} did not finish within {timeout:.0f}s")
            time.sleep(1.0)
            with LogView(kafka, READS, name="bench curve") as view:
                items = view.catch_up(timeout=120)
        finally:
            service.stop()
            validator.stop()
            trainer.stop()
            for thread in threads:
                thread.join(60)
    book = Book()
    items.sort(key=lambda i: (i.event.type != "search.requested", i.event.time))
    finished: list[tuple[Any, int]] = []
    for item in items:
        book.apply(item.event)
        if item.event.type in ("training.completed", "training.failed"):
            where = book.runs.get(item.event.data.run_id)
            if where is not None and where[0] == r.search_id:
                finished.append((item.event.time, where[1]))
    search = book.searches[r.search_id]
    curve: list[Point] = []
    used, best = 0, None
    for _, number in sorted(finished):
        trial = search.trials[number]
        used += len(trial.values)  # the epochs it reported: a pruned one stopped early
        if trial.outcome == "completed" and trial.value is not None:
            best = trial.value if best is None else max(best, trial.value)
        curve.append((used, best, trial.outcome))
    counts = search.counts()
    return Searched("tpe+median (platform)", seed, curve, counts["requested"], counts["pruned"])


# -- report ----------------------------------------------------------------------------------


def steps(points: list[Point]) -> list[Point]:
    """The points where the best so far changes, and the last one: the whole step curve."""
    out = [p for i, p in enumerate(points) if i == 0 or p[1] != points[i - 1][1]]
    return out if points[-1] in out else [*out, points[-1]]


def text_curve(points: list[Point]) -> str:
    return ", ".join(f"{e}:{'-' if b is None else f'{b:.4f}'}" for e, b, _ in steps(points))


def svg_curves(title: str, shown: list[Searched], target: float) -> str:
    """Best-so-far against cumulative epochs, one line per search (steps drawn as such)."""
    from mlbus.cli.charts import Series, line_chart

    series = []
    for s in shown:
        xy: list[tuple[float, float]] = []
        for e, b, _ in s.curve:
            if b is None:
                continue
            if xy and xy[-1][1] != b:
                xy.append((e, xy[-1][1]))
            xy.append((e, b))
        reached = s.reaching(target)
        label = f"{s.name}: {s.epochs} epochs" + (
            f", the grid's best at {reached}" if reached is not None else ", never the grid's best"
        )
        series.append(Series(s.name, label, xy))
    return line_chart(title, series, x_label="cumulative epochs")


def summary(results: list[Searched], grids: list[Searched], target: float) -> list[str]:
    lines = []
    by_name: dict[str, list[Searched]] = {}
    for s in results:
        by_name.setdefault(s.name, []).append(s)
    grid_epochs = grids[0].epochs
    for name, runs in by_name.items():
        ratios = [(s.reaching(target) or 0) / grid_epochs for s in runs if s.reaching(target)]
        reached = len(ratios)
        within = sum(1 for s in runs if (s.reaching(target) or 10**9) <= TARGET * grid_epochs)
        near = [
            (s.reaching(target - 0.005) or 0) / grid_epochs
            for s in runs
            if s.reaching(target - 0.005)
        ]
        lines.append(
            f"{name:<14} {len(runs)} seeds: trials {statistics.mean(s.trials for s in runs):.0f}"
            f" (pruned {statistics.mean(s.pruned for s in runs):.0f}), epochs "
            f"{statistics.mean(s.epochs for s in runs):.0f} of the grid's {grid_epochs}; "
            f"best {statistics.mean(s.best or 0 for s in runs):.4f} mean, "
            f"{max(s.best or 0 for s in runs):.4f} max"
        )
        lines.append(
            f"{'':<14} reached the grid's best {target:.4f}: {reached}/{len(runs)} seeds, "
            f"within {TARGET:.0%} of the grid's epochs: {within}/{len(runs)}"
            + (
                f"; epochs to reach it, as a share of the grid's: median "
                f"{statistics.median(ratios):.1%}, worst {max(ratios):.1%}"
                if ratios
                else ""
            )
        )
        if near:
            lines.append(
                f"{'':<14} within 0.5 pp of it ({target - 0.005:.4f}): {len(near)}/{len(runs)} "
                f"seeds, median {statistics.median(near):.1%} of the grid's epochs"
            )
    grid_ratios = [(g.reaching(target) or 0) / grid_epochs for g in grids]
    lines.append(
        f"{'grid':<14} in its shuffled order (a random search without pruning) reaches its "
        f"best at median {statistics.median(grid_ratios):.1%} of its epochs"
    )
    lines.append("")
    names = " / ".join(by_name)
    lines.append(f"per seed, epochs to the grid's best: grid (shuffled order) / {names}")
    for g in grids:
        row = [g.reaching(target)] + [
            next(s.reaching(target) for s in runs if s.seed == g.seed) for runs in by_name.values()
        ]
        shown = " / ".join("never" if r is None else str(r) for r in row)
        lines.append(f"  seed {g.seed}: {shown}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--table", type=Path, default=None, help="reuse or keep the table here")
    parser.add_argument(
        "--platform", type=int, default=0, help="also seeds 0..N-1 of TPE + median on the platform"
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--svg", type=Path, default=None, help="seed 0's curves as SVG")
    args = parser.parse_args()

    cpu = None
    if args.table is not None and args.table.exists():
        saved = json.loads(args.table.read_text())
        if saved["rows"] != args.rows or saved["epochs"] != args.epochs:
            raise SystemExit(f"{args.table} is for other --rows/--epochs")
        table, cpu = saved["table"], saved.get("cpu_seconds")
        log(f"table read from {args.table}")
    else:
        table, cpu = build_table(args.rows, args.epochs)
        if args.table is not None:
            args.table.write_text(
                json.dumps(
                    {"rows": args.rows, "epochs": args.epochs, "cpu_seconds": cpu, "table": table}
                )
            )
    points = len(table)
    finals = sorted((curve[-1] for curve in table.values()), reverse=True)
    target = finals[0]
    ref = DatasetRef(name="generated", version="bench")

    grids, results = [], []
    for seed in range(args.seeds):
        g = request("grid", "grid", "none", seed, args.epochs, points, ref)
        grids.append(replay(g, table, "grid", seed))
        for pruner in ("median", "halving"):
            r = request(f"tpe-{pruner}", "tpe", pruner, seed, args.epochs, points, ref)
            results.append(replay(r, table, f"tpe+{pruner}", seed))
        log(f"seed {seed}: " + ", ".join(f"{s.name} {s.reaching(target)}" for s in results[-2:]))
    platforms: list[tuple[Searched, float]] = []  # (search, wall-clock seconds)
    for seed in range(args.platform):
        r = request("tpe-median", "tpe", "median", seed, args.epochs, points, ref)
        log(f"seed {seed}, TPE + median on the platform")
        t0 = time.perf_counter()
        found = platform_search(r, args.rows, args.timeout, seed)
        platforms.append((found, time.perf_counter() - t0))
        log(f"platform search done in {platforms[-1][1]:.0f}s")

    grid_epochs = grids[0].epochs
    poor = sum(1 for f in finals if f < target - 0.05)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    lines = [
        f"bench/tuning.py  make_classification {args.rows} rows x {FEATURES} features, 5 classes "
        f"(validation {int(args.rows * 0.15)} rows), mlp, {points}-point space, "
        f"{args.epochs} epochs/trial max, {args.seeds} seeds",
        f"load average {' '.join(load)}"
        + (f"; the table: {points} points x {args.epochs} epochs, {cpu:.0f} CPU s" if cpu else ""),
        "",
        f"grid's best validation accuracy {target:.4f}; next best "
        + ", ".join(f"{f:.4f}" for f in finals[1:5])
        + f"; {poor} of {points} points are > 5 pp below it; median point "
        f"{finals[points // 2]:.4f}",
        "",
        f"baseline  grid (no pruning): {points} trials, {grid_epochs} epochs every seed",
        "mlbus     TPE (the tuning service's sampler and pruners), the same 84-trial budget:",
        *("  " + line for line in summary(results, grids, target)),
        "",
    ]
    med = [s for s in results if s.name == "tpe+median"]
    ok = sum(1 for s in med if (s.reaching(target) or 10**9) <= TARGET * grid_epochs)
    lines.append(
        f"target: TPE + median pruning reaches the grid's best within {TARGET:.0%} of the "
        f"grid's epochs: {ok}/{len(med)} seeds  {'ok' if ok * 2 > len(med) else 'FAIL'} "
        f"(majority of seeds)"
    )
    if platforms:
        lines += [
            "",
            "on the platform (broker, tuning service, training worker), beside the replay:",
        ]
    for platform, seconds in platforms:
        replayed = next(m for m in med if m.seed == platform.seed)
        at = platform.reaching(target)
        share = f"{(at or 0) / grid_epochs:.1%}"
        lines.append(
            f"  seed {platform.seed}, {seconds:.0f} s: {platform.trials} trials "
            f"({platform.pruned} pruned), {platform.epochs} epochs, best {platform.best or 0:.4f}, "
            f"the grid's best reached at {at} epochs ({share} of the grid's); replayed: "
            f"{replayed.trials} trials ({replayed.pruned} pruned), {replayed.epochs} epochs, "
            f"reached at {replayed.reaching(target)}"
        )
    lines += [
        "",
        "curves, seed 0: cumulative epochs -> best validation accuracy so far (where it "
        "changes, and the end)",
    ]
    shown = [grids[0], *(s for s in results if s.seed == 0)]
    shown += [platform for platform, _ in platforms if platform.seed == 0]
    for s in shown:
        lines.append(f"{s.name:>22}  {text_curve(s.curve)}")
    report = "\n".join(lines)
    print(report)
    if args.svg is not None:
        args.svg.write_text(svg_curves("best validation accuracy so far, seed 0", shown, target))
    if args.out is not None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        args.out.write_text(f"# measured {stamp}\n{report}\n")


if __name__ == "__main__":
    main()

"""A search's trials on several trainer workers: the same search with one `mlbus run trainer`
process and with W, in one run.

    .venv/bin/python bench/parallel_trials.py [--workers 2] [--trials 8] [--parallel 2]
        [--epochs 10] [--rows 100000] [--timeline] [--logs DIR] [--json]

Each side gets a fresh embedded broker, `mlbus run validator`, `mlbus run tuning` and its
trainer processes (real processes, as `mlbus up` starts them). Once the dataset is validated
and the trainers' group is stable, one search is published: random sampler with a fixed
search id (the same trials, the same hyperparameters on both sides), no pruner (every trial
trains all its epochs: the same compute on both sides), `parallel` trials requested at once,
`mlp` on a generated 5-class table. The figure is the wall time from the search's request to
its `search.completed`, and the ratio of the one-worker time to the W-worker time. Each
trial's request is keyed by its own id, so the trials spread over `training.requested`'s
partitions by hash; the partitions the trials landed on, how many trials trained at once
(sum of trial durations / wall time) and each trial's request, start and completion times
(`--timeline`) are printed beside. `--logs DIR` keeps the services' output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from mlbus.broker import EmbeddedBroker
from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.sources import from_table
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import decode
from mlbus.schemas.search import Objective, SearchRequested
from mlbus.schemas.training import run_id_for
from mlbus.search import parse_space
from mlbus.services import service
from mlbus.storage import ObjectStore

MLBUS = str(Path(sys.executable).parent / "mlbus")
SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "hidden": {"type": "int", "low": 64, "high": 256},
}
SEARCH_ID = "bench-parallel-trials"


def log(message: str) -> None:
    print(f"[bench/parallel_trials] {message}", file=sys.stderr, flush=True)


def table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 32)).astype(np.float32)
    y = (x @ rng.normal(size=(32, 5))).argmax(axis=1)
    return pa.table({**{f"f{i}": x[:, i] for i in range(32)}, "label": y})


def events(kafka: KafkaConfig, event_type: str) -> list[tuple[Any, int]]:
    """(event, partition) of every record of the topic, read to its end."""
    reader = TopicReader(kafka, [kafka.topic(event_type)], start="beginning")
    return [(decode(m.value(), m.headers()), m.partition()) for m in reader]


@contextmanager
def platform(tmp: Path, workers: int) -> Iterator[tuple[KafkaConfig, ObjectStore]]:
    """A fresh broker with the validator, the tuning service and `workers` trainers."""
    with ExitStack() as stack:
        # Recorded in the data dir: the services find it there and use the embedded
        # broker's client settings, as under `mlbus up` (a configured bootstrap would give
        # them a cluster's, whose 45 s session timeout makes a group join take ~20 s here).
        broker = stack.enter_context(EmbeddedBroker(tmp / "data", record=True))
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        apply_topics(kafka)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")} | {
            "MLBUS_DATA_DIR": str(tmp / "data"),
            "OMP_NUM_THREADS": "1",
        }
        processes: list[subprocess.Popen[bytes]] = []

        def stop() -> None:
            for p in processes:
                p.terminate()
            for p in processes:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

        stack.callback(stop)
        for service in ["validator", "tuning"] + ["trainer"] * workers:
            with (tmp / f"{service}.log").open("ab") as out:
                process = subprocess.Popen(
                    [MLBUS, "run", service], env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(process)
        yield kafka, ObjectStore((tmp / "data" / "objects").resolve().as_uri())


def ready(kafka: KafkaConfig, timeout: float = 180.0) -> None:
    """Before the clock starts: the dataset validated, and the trainers' group stable in two
    looks 3 s apart (their first join takes the embedded broker many seconds; it would
    otherwise be measured as the search's time). The embedded broker describes a group's
    state but not its members."""
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    group = service("trainer").group_id(kafka.topic_prefix)
    deadline, stable = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and stable < 2:
        (described,) = admin.describe_consumer_groups([group]).values()
        try:
            state = described.result(10).state
        except KafkaException:
            state = None
        validated = bool(events(kafka, "dataset.validated"))
        stable = stable + 1 if validated and state == ConsumerGroupState.STABLE else 0
        time.sleep(3.0)
    if stable < 2:
        raise SystemExit(f"the dataset was not validated or {group} not stable in {timeout:.0f}s")


def one_side(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mlbus-bench-trials-") as name:
        tmp = Path(name)
        with platform(tmp, workers) as (kafka, store):
            with DatasetRegistry(store, kafka) as registry:
                data = registry.register(from_table(table(args.rows)), name="gen", label="label")
            search = SearchRequested(
                search_id=SEARCH_ID,
                model="bench-trials",
                dataset=DatasetRef(name="gen", version=data.version),
                family="mlp",
                space=parse_space(SPACE),
                sampler="random",
                pruner="none",
                objective=Objective(metric="validation.accuracy"),
                trials=args.trials,
                parallel=args.parallel,
                seed=0,
                max_epochs=args.epochs,
            )
            ready(kafka)
            with EventProducer(kafka, source="bench") as out:
                began = time.monotonic()
                out.publish(search, event_id=SEARCH_ID)
                out.flush()
            while time.monotonic() - began < args.timeout:
                if events(kafka, "search.completed"):
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"the search did not complete in {args.timeout:.0f}s ({tmp})")
            wall = time.monotonic() - began
            requested = [
                (e, p) for e, p in events(kafka, "training.requested") if e.data.trial is not None
            ]
            started = {e.data.run_id: e.time for e, _ in events(kafka, "training.started")}
            ended = {e.data.run_id: e.time for e, _ in events(kafka, "training.completed")}
        if args.logs is not None:  # the services' output, kept
            kept = args.logs / f"{workers}-workers"
            kept.mkdir(parents=True, exist_ok=True)
            for service in ("validator", "tuning", "trainer"):
                shutil.copy(tmp / f"{service}.log", kept / f"{service}.log")
    # each trial by its run id: when it was requested, started and completed
    asked = {run_id_for(e.id): e.time for e, _ in requested}
    took = {r: (ended[r] - started[r]).total_seconds() for r in ended if r in started}
    to_start = [(started[r] - asked[r]).total_seconds() for r in asked if r in started]
    # from a trial's completion to the next trial's request (the tuning service's turn)
    ends, asks = sorted(ended.values()), sorted(asked.values())
    turn = [
        min((a - t).total_seconds() for a in asks if a >= t)
        for t in ends
        if any(a >= t for a in asks)
    ]
    first = min(asked.values())
    timeline = []
    for e, p in sorted(requested, key=lambda item: item[0].data.trial.number):
        run = run_id_for(e.id)
        timeline.append(
            {
                "trial": e.data.trial.number,
                "partition": p,
                "requested": (asked[run] - first).total_seconds(),
                "started": _since(started.get(run), first),
                "completed": _since(ended.get(run), first),
            }
        )
    return {
        "timeline": timeline,
        "request_to_start_s": statistics.median(to_start),
        "completion_to_next_request_s": statistics.median(turn) if turn else None,
        "training_s": statistics.median(took.values()),
        "workers": workers,
        "wall_s": wall,
        "trials_completed": len(ended),
        "partitions": sorted(p for _, p in requested),
        "trials_at_once": sum(took.values()) / wall,
    }


def _since(when: Any, first: Any) -> float | None:
    return None if when is None else (when - first).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--logs", type=Path, default=None, help="keep the services' output here")
    parser.add_argument("--timeline", action="store_true", help="print each trial's times")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sides = []
    for workers in (1, args.workers):
        log(f"{workers} trainer worker(s): {args.trials} trials, {args.parallel} at once")
        sides.append(one_side(workers, args))
        log(f"done in {sides[-1]['wall_s']:.1f}s")
    one, many = sides
    result = {"sides": sides, "speedup": one["wall_s"] / many["wall_s"], "args": vars(args)}
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"one search, {args.trials} trials (mlp, {args.epochs} epochs each, no pruning, random "
        f"sampler, fixed search id), {args.parallel} requested at once"
    )
    for side in sides:
        print(
            f"  {side['workers']} trainer worker(s): {side['wall_s']:.1f} s to search.completed, "
            f"{side['trials_completed']} trials completed, {side['trials_at_once']:.2f} "
            f"trials training at once on average; trial partitions {side['partitions']}"
        )
        print(
            f"    median per trial: request -> started {side['request_to_start_s']:.2f} s, "
            f"started -> completed {side['training_s']:.2f} s, completed -> next request "
            f"{side['completion_to_next_request_s'] or 0:.2f} s"
        )
        if args.timeline:
            for t in side["timeline"]:
                print(
                    f"    trial {t['trial']} (partition {t['partition']}): requested at "
                    f"{t['requested']:.2f} s, started {t['started'] or 0:.2f}, completed "
                    f"{t['completed'] or 0:.2f}"
                )
    print(
        f"{args.workers} workers vs 1: {result['speedup']:.2f}x "
        f"(at most {min(args.workers, args.parallel)}x)"
    )


if __name__ == "__main__":
    main()

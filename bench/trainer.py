"""Training throughput of the mlbus worker against a plain PyTorch loop, in one run.

    .venv/bin/python bench/trainer.py [--rows N] [--epochs E] [--repeat R] [--json] [--profile]

Three workloads: the sklearn digits sample (1,797 8x8 images as pixel columns) with the
`cnn` family; the same images as one [1, 8, 8] tensor column (`digits_images`) with the
example plugin family `resnet` (examples/mlbus-resnet-family, installed by `make install`),
fed as [N, 1, 8, 8]; and a synthetic tabular dataset of --rows rows (default 1,000,000; 20
float32 features, 4 classes from a noisy linear rule, numpy with a fixed seed) with the
`mlp` family. All are registered with the dataset manager on a `file://` object store
(Parquet, content hash, `dataset.created`) on an embedded Tansu broker in a temp dir,
deleted at the end.

For each workload, the same model, hyperparameters, seed and epochs:

1. plain loop   the training split as in-memory tensors (the very tensors the worker would
                train on, standardised), `randperm` + slices, zero_grad / forward /
                cross-entropy / backward / Adam step; nothing else (no evaluation, no
                `.item()`, no events). samples/s = epochs x training rows / wall time. Run
                in a thread, as the worker's handler is (see `plain_loop`).
2. mlbus epoch  the worker's own per-epoch figure (`training.progress.samples_per_second`,
                the mean over epochs): the same loop inside `trainer.training.fit`.
3. mlbus e2e    `TrainingWorker` handling one `training.requested` in a `ConsumerLoop`,
                timed around the handler call: the dataset lookup in the log, Parquet
                streamed from the store into tensors with the hash verified, standardisation,
                every epoch with its validation pass, checkpoint and `training.progress`,
                final evaluation, inference-latency probe, artifact write and the confirmed
                `training.completed`. samples/s = epochs x training rows / that time.

The target is e2e >= 85 % of the plain loop; for the plugin family on tensor input, per
epoch >= 90 % of the plain loop on the same tensors. --only KEY runs one workload. The
same two figures per CPU second of the process (`time.process_time`) are printed too: on a
shared machine they are steadier. Each figure is the best of --repeat runs; the worker and
the loop alternate so this shared machine's drift hits both alike, after one untimed
warm-up epoch. --profile prints the top of a cProfile of one worker run per workload.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from bench.common import Figure, Figures, publish_summary, render_table
from mlbus.broker import EmbeddedBroker
from mlbus.families import build, hyperparameters, resolve
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.kafka.logview import dataset_versions
from mlbus.kafka.producer import EventProducer
from mlbus.ml.tensors import tensor_shape
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.envelope import Event
from mlbus.schemas.training import TrainingRequested
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader
from mlbus.trainer.data import Prepared, load_arrays, prepare
from mlbus.trainer.worker import TrainingWorker

TARGET_RATIO = 0.85
#: Per-epoch throughput of the plugin family on tensor input against the plain loop.
EPOCH_TARGET_RATIO = 0.9
SEED = 0


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    family: str
    params: dict[str, Any]
    epochs: int


@dataclass
class Report(Figures):
    figures: dict[str, Figure] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)


def synthetic(rows: int, features: int = 20, classes: int = 4) -> pa.Table:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    weights = rng.standard_normal((features, classes), dtype=np.float32)
    logits = x @ weights + rng.standard_normal((rows, classes), dtype=np.float32)
    columns = {f"f{i:02d}": x[:, i] for i in range(features)}
    return pa.table(columns | {"label": logits.argmax(axis=1).astype(np.int64)})


def prepared_of(
    kafka: KafkaConfig, store: ObjectStore, name: str, version: str, family: str
) -> Prepared:
    """The tensors the worker trains on, built as it builds them (untimed)."""
    with dataset_versions(kafka) as known:
        found = known.get((name, version))
    assert found is not None, f"{name}@{version} is not in the log"
    data = found.data
    label = data.label_column
    assert label is not None
    features = [c.name for c in data.arrow_schema if c.name != label]
    with DatasetReader(store, data.uri, data.content_hash) as reader:
        shape = tensor_shape(reader.schema, features)
        x, labels = load_arrays(
            reader, num_rows=reader.num_rows, features=features, label=label, shape=shape
        )
    return prepare(
        x,
        labels,
        features=features,
        label=label,
        seed=SEED,
        validation=0.15,
        test=0.15,
        input_shape=shape,
        feed_shape=resolve(family).feed_shape(shape or [len(features)]),
    )


def validate(kafka: KafkaConfig, store: ObjectStore) -> None:
    """Run the validator over what is announced: the worker trains validated versions only."""
    from mlbus.datasets.validator import Validator

    with EventProducer(kafka, source="mlbus/datasets") as producer:
        ConsumerLoop(
            kafka,
            group="bench-validator",
            name="validator",
            handlers={"dataset.created": Validator(store, producer)},
        ).run(stop_at_end=True, install_signal_handlers=False)


def plain_loop(data: Prepared, work: Workload) -> tuple[float, float]:
    """(samples/s, samples per CPU second) of the textbook loop on in-memory tensors, run in
    a thread of its own as the worker's handler is: torch's intra-op threading differs
    between the main thread and the others (here the main thread trained several times
    slower), so both sides train in the same kind of thread."""
    result: list[tuple[float, float]] = []
    thread = threading.Thread(target=lambda: result.append(_plain_loop(data, work)))
    thread.start()
    thread.join()
    return result[0]


def _plain_loop(data: Prepared, work: Workload) -> tuple[float, float]:
    params = hyperparameters(work.family, work.params)
    torch.manual_seed(SEED)
    model = build(work.family, data.input_shape, len(data.classes), params)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"])
    )
    x, y = data.x["train"], data.y["train"]
    batch = int(params["batch_size"])
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(work.epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            index = order[i : i + batch]
            optimiser.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
    samples = work.epochs * len(x)
    return samples / (time.perf_counter() - started), samples / (time.process_time() - started_cpu)


def worker_run(
    kafka: KafkaConfig,
    store: ObjectStore,
    dataset: DatasetRef,
    work: Workload,
    n_train: int,
    profile: bool,
) -> tuple[float, float, float, str | None]:
    """(end-to-end samples/s, per-epoch samples/s, end-to-end samples per CPU second,
    profile text) of one request."""
    with EventProducer(kafka, source="bench") as producer:
        request = producer.publish(
            TrainingRequested(
                model=dataset.name,
                family=work.family,
                hyperparameters=work.params,
                seed=SEED,
                max_epochs=work.epochs,
                device="cpu",
                dataset=dataset,
            )
        )
    timings: list[float] = []
    cpu: list[float] = []
    rates: list[float] = []
    profiler = cProfile.Profile() if profile else None
    with EventProducer(kafka, source="mlbus/trainer") as producer:
        worker = TrainingWorker(kafka, store, producer)
        publish = producer.publish

        def watched(payload: Any, **kw: Any) -> Any:  # the worker's own per-epoch figure
            if type(payload).__name__ == "TrainingProgress":
                rates.append(payload.samples_per_second)
            return publish(payload, **kw)

        producer.publish = watched  # type: ignore[method-assign]
        loop: ConsumerLoop

        def timed(event: Event, record: Record) -> None:
            if event.id != request.id:
                return
            started, started_cpu = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.enable()
            try:
                worker(event, record)
            finally:
                if profiler is not None:
                    profiler.disable()
                timings.append(time.perf_counter() - started)
                cpu.append(work.epochs * n_train / (time.process_time() - started_cpu))
                loop.stop()

        loop = ConsumerLoop(
            kafka,
            group=f"bench-{request.id}",
            name="trainer",
            long_running=True,
            handlers={"training.requested": timed},
        )
        thread = threading.Thread(target=loop.run, kwargs={"install_signal_handlers": False})
        thread.start()
        thread.join()
        worker.close()
    assert timings, "the worker never handled the request"
    text = None
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        text = out.getvalue()
    per_epoch = len(rates) / sum(1.0 / r for r in rates)  # total samples / total epoch time
    return work.epochs * n_train / timings[0], per_epoch, cpu[0], text


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Report:
    report = Report()
    wall = time.perf_counter()
    workloads = [
        Workload("digits", "digits CNN", "cnn", {}, args.digits_epochs),
        Workload(
            "digits_images",
            "digits [1,8,8] tensors, plugin resnet",
            "resnet",
            {"width": 16, "blocks": 1},
            args.image_epochs,
        ),
        Workload(
            "tabular",
            f"tabular MLP ({args.rows:,} rows)",
            "mlp",
            {"batch_size": args.batch_size},
            args.epochs,
        ),
    ]
    if args.only:
        workloads = [w for w in workloads if w.key == args.only]
    report.setup = {
        "rows": args.rows,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "workloads": {
            w.key: {"family": w.family, "params": w.params, "epochs": w.epochs} for w in workloads
        },
    }
    with tempfile.TemporaryDirectory(prefix="mlbus-bench-trainer-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(Path(tmp) / "broker", record=False))
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        apply_topics(kafka)
        store = ObjectStore((Path(tmp) / "objects").as_uri())
        from mlbus.datasets.registry import DatasetRegistry
        from mlbus.datasets.samples import sample_table
        from mlbus.datasets.sources import from_table

        registry = DatasetRegistry(store, kafka)
        log("registering the datasets")
        tables = {
            "digits": lambda: sample_table("digits"),
            "digits_images": lambda: sample_table("digits_images"),
            "tabular": lambda: synthetic(args.rows),
        }
        versions = {
            w.key: registry.register(from_table(tables[w.key]()), name=w.key, label="label").version
            for w in workloads
        }
        registry.close()
        validate(kafka, store)
        for work in workloads:
            dataset = DatasetRef(name=work.key, version=versions[work.key])
            data = prepared_of(kafka, store, work.key, dataset.version, work.family)
            n_train = len(data.x["train"])
            # Untimed warm-up: the first passes through a model pay for one-time setup
            # (oneDNN primitives, allocator growth) that neither side should be charged.
            plain_loop(data, Workload(work.key, work.label, work.family, work.params, 1))
            plain, plain_cpu, e2e, e2e_cpu, epoch = 0.0, 0.0, 0.0, 0.0, 0.0
            for attempt in range(args.repeat):
                log(f"{work.label}: plain loop, run {attempt + 1}")
                rate, per_cpu = plain_loop(data, work)
                plain, plain_cpu = max(plain, rate), max(plain_cpu, per_cpu)
                log(f"{work.label}: mlbus worker, run {attempt + 1}")
                rate, per_epoch, per_cpu, profile = worker_run(
                    kafka, store, dataset, work, n_train, args.profile and attempt == 0
                )
                e2e, epoch = max(e2e, rate), max(epoch, per_epoch)
                e2e_cpu = max(e2e_cpu, per_cpu)
                if profile:
                    report.profiles[work.key] = profile
            base = report.add(
                Figure(
                    f"{work.key}.plain",
                    f"{work.label}: plain PyTorch loop",
                    plain,
                    unit="samples/s",
                )
            )
            tensors = work.family == "resnet"
            per_epoch = report.add(
                Figure(
                    f"{work.key}.epoch",
                    f"{work.label}: mlbus, per epoch",
                    epoch,
                    base.key,
                    target=f">= {EPOCH_TARGET_RATIO:.0%}" if tensors else "",
                    unit="samples/s",
                )
            )
            if tensors:
                epoch_ratio = report.ratio(per_epoch)
                per_epoch.ok = epoch_ratio is not None and epoch_ratio >= EPOCH_TARGET_RATIO
            whole = report.add(
                Figure(
                    f"{work.key}.e2e",
                    f"{work.label}: mlbus worker end to end",
                    e2e,
                    base.key,
                    target=f">= {TARGET_RATIO:.0%}",
                    unit="samples/s",
                    detail={"train_rows": n_train, "epochs": work.epochs},
                )
            )
            ratio = report.ratio(whole)
            whole.ok = ratio is not None and ratio >= TARGET_RATIO
            # Samples per CPU second of the process: steadier than the wall clock on a
            # shared machine (the broker runs in its own process and is not counted).
            base_cpu = report.add(
                Figure(
                    f"{work.key}.plain_cpu",
                    f"{work.label}: plain, CPU",
                    plain_cpu,
                    unit="samples/cpu-s",
                )
            )
            report.add(
                Figure(
                    f"{work.key}.e2e_cpu",
                    f"{work.label}: mlbus e2e, CPU",
                    e2e_cpu,
                    base_cpu.key,
                    unit="samples/cpu-s",
                )
            )
    report.setup["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return report


def table(report: Report) -> str:
    rows = []
    for figure in report.figures.values():
        ratio = report.ratio(figure)
        verdict = "" if figure.ok is None else ("ok" if figure.ok else "BELOW TARGET")
        rows.append(
            [
                figure.label,
                f"{figure.value:,.0f}",
                f"{ratio:.1%}" if ratio is not None else "",
                figure.target,
                verdict,
            ]
        )
    header = ["figure", "samples/s (cpu-s)", "vs plain", "target", ""]
    return "\n".join(render_table(header, rows))


def as_json(report: Report) -> dict[str, Any]:
    return {
        "setup": report.setup,
        "figures": {
            k: {
                "label": f.label,
                "value": f.value,
                "unit": f.unit,
                "ratio": report.ratio(f),
                "target": f.target,
                "ok": f.ok,
                **f.detail,
            }
            for k, f in report.figures.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic tabular rows")
    parser.add_argument("--epochs", type=int, default=2, help="tabular MLP epochs")
    parser.add_argument("--digits-epochs", type=int, default=15, help="digits CNN epochs")
    parser.add_argument("--image-epochs", type=int, default=5, help="plugin resnet epochs")
    parser.add_argument("--batch-size", type=int, default=256, help="tabular MLP batch size")
    parser.add_argument("--only", help="one workload: digits, digits_images or tabular")
    parser.add_argument("--repeat", type=int, default=2, help="best of N")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--profile", action="store_true", help="cProfile one worker run each")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[bench/trainer] {message}", file=sys.stderr, flush=True)

    report = run(args, log)
    publish_summary("trainer", report)
    if args.json:
        print(json.dumps(as_json(report)))
    else:
        print(table(report))
        state = (
            "all targets met"
            if all(f.ok for f in report.figures.values() if f.ok is not None)
            else "TARGET MISSED"
        )
        print(f"total wall time {report.setup['wall_seconds']} s; {state}")
    for key, text in report.profiles.items():
        print(
            f"\n-- profile of one mlbus worker run: {key}\n{text}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

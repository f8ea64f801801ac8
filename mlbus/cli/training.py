"""`mlbus trainer` (the training worker service) and `mlbus train` (experiments: one
request per sweep point under one correlation id, followed live until they finish)."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, cast

import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from mlbus.cli.common import app, console, kafka_config, key_values, scalar, settings
from mlbus.errors import MlbusError
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import DurableProducer, EventProducer
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import decode
from mlbus.schemas.envelope import new_event_id
from mlbus.schemas.training import SweepPoint, TrainingRequested
from mlbus.services import Service, service
from mlbus.settings import Settings
from mlbus.storage import ObjectStore

FOLLOWED = ("training.started", "training.progress", "training.completed", "training.failed")


@app.command("trainer")
def trainer() -> None:
    """Run a training worker (several share training.requested through one group). Same as
    `mlbus run trainer`."""
    run_trainer(service("trainer"), settings())


def run_trainer(manifest: Service, cfg: Settings) -> None:
    """A training worker in the foreground (`mlbus run trainer`)."""
    from mlbus.extras import require
    from mlbus.kafka.transaction import Transactional

    require("platform")  # torch is imported with the first request: say now if it is missing
    from mlbus.trainer.rendezvous import Joiner, Timeouts

    kafka = kafka_config(cfg)
    group = manifest.group_id(cfg.topic_prefix)
    # The embedded broker never ends the open transaction of a killed worker, and its
    # read_committed readers stop there for good (docs/broker.md): no transactions there.
    wanted = cfg.trainer.transactions
    if wanted is None:
        wanted = not kafka.embedded
    transactions = Transactional(kafka, prefix=group) if wanted else None
    store = ObjectStore.from_settings(cfg)
    timeouts = Timeouts(
        join=cfg.trainer.rendezvous_timeout_seconds,
        collective=cfg.trainer.collective_timeout_seconds,
    )
    # The name the worker publishes as (TrainingWorker.worker): the joiner skips its own runs.
    name = f"{socket.gethostname()}:{os.getpid()}"
    with EventProducer(kafka, source=manifest.source) as producer:

        def build() -> Any:
            from mlbus.trainer.worker import TrainingWorker  # torch and Arrow: ~200 MB

            return TrainingWorker(
                kafka,
                store,
                producer,
                validation_wait_seconds=cfg.trainer.validation_wait_seconds,
                transactions=transactions,
                rendezvous=timeouts,
                advertise=cfg.trainer.advertise_address,
                torch_threads=cfg.trainer.torch_threads,
            )

        def member(plan: dict[str, Any], rank: int, world: int) -> None:
            from mlbus.trainer.member import train_member  # torch with the first run joined

            train_member(store, plan, rank, world, torch_threads=cfg.trainer.torch_threads)

        unbuilt = transactions.close if transactions is not None else None
        with contextlib.closing(_OnFirstRequest(build, unbuilt)) as worker:
            console.print(f"training worker {name} waiting for training.requested")
            # Joins the data-parallel runs other workers host (docs/distributed.md).
            joiner = Joiner(kafka, name, member, timeouts).start()
            try:
                ConsumerLoop(
                    kafka,
                    group=group,
                    name=manifest.name,
                    long_running=True,
                    handlers={"training.requested": worker},
                ).run()
            finally:
                joiner.stop()


class _OnFirstRequest:
    """The training worker, built when the first request arrives: a worker that waits
    holds neither torch nor Arrow (about 200 MB resident) nor the worker's log views."""

    def __init__(self, build: Any, unbuilt: Any = None) -> None:
        self._build = build
        self._unbuilt = unbuilt  # what closing stops when no worker was built
        self._worker: Any = None

    def __call__(self, event: Any, record: Any) -> None:
        if self._worker is None:
            self._worker = self._build()
            console.print(f"training worker {self._worker.worker} loaded")
        self._worker(event, record)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        elif self._unbuilt is not None:
            self._unbuilt()


@app.command("train")
def train(
    model: Annotated[str, typer.Argument(help="model name")],
    dataset: Annotated[
        str, typer.Option(help="NAME@VERSION (a unique version prefix will do; resolved here)")
    ],
    family: Annotated[
        str, typer.Option(help="model family: mlp, cnn, an installed plugin's, module:callable")
    ] = "mlp",
    task: Annotated[
        str | None,
        typer.Option(help="classification or regression (default: the family's first)"),
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="regression loss: mse (default) or huber")
    ] = None,
    param: Annotated[list[str], typer.Option(help="KEY=VALUE hyperparameter")] = [],  # noqa: B006
    sweep: Annotated[list[str], typer.Option(help="KEY=V1,V2,... one run per combination")] = [],  # noqa: B006
    epochs: Annotated[int, typer.Option(help="max epochs")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="trainer workers that train each run together (data parallel)"
        ),
    ] = 1,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present, else cpu)")
    ] = None,
    deadline_seconds: Annotated[
        float | None,
        typer.Option(
            "--deadline",
            help="seconds after which a sweep's runs without an outcome are declared failed "
            "(default: MLBUS_WORKFLOW__SWEEP_DEADLINE_SECONDS)",
            min=1,
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the runs until they finish")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="completed runs as JSON lines")] = False,
) -> None:
    """Request training runs (a sweep is one run per combination, one correlation id)."""
    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.refs import parse

    # Resolved here, against the log: the requests carry the full version.
    ref = parse(dataset, what="--dataset NAME", need_version=True)
    kafka = kafka_config()
    found = DatasetRegistry(ObjectStore.from_settings(settings()), kafka).get(str(ref)).data
    name, version = found.name, found.version
    fixed = {k: scalar(v) for k, v in key_values(param, "--param").items()}
    axes = {
        k: [scalar(v) for v in vs.split(",") if v] for k, vs in key_values(sweep, "--sweep").items()
    }
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    # Checked here as the trainer will check them: a request that can never run is not sent.
    from mlbus.families import check_request

    if loss not in (None, "mse", "huber"):
        raise typer.BadParameter(f"--loss {loss!r}: use mse or huber")
    for point in points:
        chosen, origin = check_request(family, task, fixed | point)
    # The workflow declares the runs still missing then failed (the sweep then ends).
    seconds = deadline_seconds or settings().workflow.sweep_deadline_seconds
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    requests = [
        TrainingRequested(
            model=model,
            dataset=DatasetRef(name=name, version=version),
            family=family,
            task=chosen,
            loss=cast(Literal["mse", "huber"] | None, loss),  # checked above
            family_origin=origin,
            hyperparameters=fixed | point,
            seed=seed,
            max_epochs=epochs,
            device=device,
            workers=workers,
            requested_by="cli",
            sweep=SweepPoint(sweep_id=correlation, index=i, size=len(points), deadline=deadline)
            if axes
            else None,
        )
        for correlation in [new_event_id()]
        for i, point in enumerate(points)
    ]
    events: queue.Queue[Any] = queue.Queue()
    reader = TopicReader(kafka, [kafka.topic(t) for t in FOLLOWED], start="end", follow=True)
    if wait or json_out:

        def follow() -> None:
            for message in reader:
                events.put(message)

        threading.Thread(target=follow, daemon=True).start()
        reader.caught_up.wait(30)
    correlation = requests[0].sweep.sweep_id if requests[0].sweep else None
    with DurableProducer(kafka, source="mlbus/cli") as producer:
        ids = [producer.publish(r, correlationid=correlation).id for r in requests]
    if not (wait or json_out):
        for event_id, request in zip(ids, requests, strict=True):
            console.print(f"requested {model} {request.hyperparameters} → {event_id}")
        return
    try:
        failed = _follow(ids, requests, events, kafka.event_type, json_out)
    finally:
        reader.stop()
    raise typer.Exit(1 if failed else 0)


def _follow(
    ids: list[str],
    requests: list[TrainingRequested],
    events: queue.Queue[Any],
    event_type: Any,
    json_out: bool,
) -> int:
    results: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        console=console if not json_out else None,
        disable=json_out,
    ) as bars:
        tasks = {
            i: bars.add_task(f"run {n + 1} {r.hyperparameters}", total=r.max_epochs, info="queued")
            for n, (i, r) in enumerate(zip(ids, requests, strict=True))
        }
        while len(results) < len(ids):
            message = events.get()
            try:
                event = decode(
                    message.value(), message.headers(), expected_type=event_type(message.topic())
                )
            except MlbusError:
                continue
            request = event.causationid
            if request not in tasks:
                continue
            if event.type == "training.progress":
                accuracy = event.data.metrics.get("validation.accuracy")
                info = f"epoch {event.data.epoch}"
                if accuracy is not None:
                    info += f", validation accuracy {accuracy:.3f}"
                bars.update(tasks[request], completed=event.data.epoch, info=info)
            elif event.type == "training.started":
                info = f"started on {event.data.worker}"
                if event.data.resumed_from_epoch is not None:
                    info = f"attempt {event.data.attempt} on {event.data.worker}, resumed"
                bars.update(tasks[request], completed=event.data.resumed_from_epoch or 0, info=info)
            elif event.type == "training.failed" and event.data.retryable:
                # The worker retries it (transient failure): the run is not over.
                bars.update(tasks[request], info=f"[yellow]retrying: {event.data.reason}")
            elif event.type in ("training.completed", "training.failed"):
                results[request] = event
                if event.type == "training.completed":
                    bars.update(tasks[request], completed=event.data.epochs, info="[green]done")
                else:
                    bars.update(tasks[request], info=f"[red]failed: {event.data.reason}")
    failed = sum(e.type == "training.failed" for e in results.values())
    if json_out:
        for i in ids:
            e = results[i]
            if e.type == "training.completed":
                d = e.data
                sys.stdout.write(
                    orjson.dumps(
                        {
                            "run_id": d.run_id,
                            "version": d.version,
                            "hyperparameters": d.hyperparameters,
                            "metrics": d.metrics,
                            "artifact_uri": d.artifact.uri,
                            "artifact_sha256": d.artifact.sha256,
                            "device": d.device,
                        }
                    ).decode()
                    + "\n"
                )
        return failed
    table = Table(
        "run", "hyperparameters", "epochs", "test accuracy", "test loss", "p95 latency", "status"
    )
    for n, i in enumerate(ids):
        e = results[i]
        if e.type == "training.completed":
            test = e.data.metrics.get("test", {})
            p95 = e.data.metrics.get("inference", {}).get("latency_p95_ms")
            table.add_row(
                e.data.run_id[:12],
                str(requests[n].hyperparameters),
                str(e.data.epochs),
                f"{test.get('accuracy', float('nan')):.4f}",
                f"{test.get('loss', float('nan')):.4f}",
                "-" if p95 is None else f"{p95:.2f} ms",
                "[green]completed",
            )
        else:
            table.add_row(
                e.data.run_id[:12],
                str(requests[n].hyperparameters),
                "-",
                "-",
                "-",
                "-",
                f"[red]failed[/]: {e.data.reason}",
            )
    console.print(table)
    return failed

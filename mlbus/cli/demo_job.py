"""`mlbus demo` (what `make demo` runs): the main job, end to end, on the embedded defaults.

It starts `mlbus up` (embedded broker and every service, in a fresh data dir), applies the
digits pipeline, registers the scikit-learn digits sample, follows the training live, sees
the model promoted and loaded, asks it for predictions over HTTP and over
`inference.requests`, shows the serving metrics the stream processors computed, registers a
second version of the dataset (the digits plus shifted copies), sees the retrain and the
second promotion, and prints the serving model's lineage (a tree, and a graph written to the
data dir) and its audit trail. Then it stops the platform and starts it again on the same
data dir: the journal restores the log, and the same champion is served with the same
lineage. It stops everything it started and exits 1 if a step failed.
The command itself is mlbus/cli/demo.py, which imports this module when it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa

from mlbus.broker import die_with_parent_guard, free_port
from mlbus.cli.common import console, settings
from mlbus.cli.platform import service_env
from mlbus.errors import MlbusError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import Tensor
from mlbus.schemas.envelope import Event
from mlbus.schemas.serving import InferenceRequest
from mlbus.settings import Settings, load_settings
from mlbus.storage import ObjectStore
from mlbus.supervisor import read_status

MODEL = "digits"
FOLLOWED = (
    "training.requested", "training.started", "training.progress", "training.completed",
    "training.failed", "model.promoted", "model.rejected", "deployment.updated",
    "inference.results", "serving.metrics", "serving.alert",
)  # fmt: skip


class DemoFailed(MlbusError):
    """A step of the demo did not happen in time."""


def _step(n: int, text: str) -> None:
    console.print(f"\n[bold cyan]{n}.[/] [bold]{text}[/]")


class Log:
    """Every event of the followed topics, in a thread, for the steps to wait on."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.view = LogView(
            kafka, FOLLOWED, on_event=lambda item: self.events.put(item.event), name="demo-log"
        ).start()

    def wait(
        self,
        what: str,
        match: Callable[[Event], bool],
        timeout: float,
        show: Callable[[Event], None] | None = None,
    ) -> Event:
        """The first event (seen before or arriving within `timeout`) that `match`es;
        every new event is passed to `show` on the way."""
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.view.error is not None:
                raise DemoFailed(f"reading the log failed: {self.view.error}")
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(event)
            if show is not None:
                show(event)
            if match(event):
                return event
        raise DemoFailed(f"{what}: not seen within {timeout:.0f}s")

    def stop(self) -> None:
        self.view.stop(5)


def _show_training(event: Event) -> None:
    data: Any = event.data
    if event.type == "training.requested":
        ref = f"{data.dataset.name}@{data.dataset.version[:12]}"
        console.print(
            f"   training.requested  {data.model} ({data.family}) on {ref} by {data.requested_by}"
        )
    elif event.type == "training.started":
        console.print(f"   training.started    run {data.run_id[:12]} on worker {data.worker}")
    elif event.type == "training.progress":
        metrics = data.metrics
        console.print(
            f"   epoch {data.epoch:>2}/{data.max_epochs}  train loss "
            f"{metrics.get('train.loss', float('nan')):.3f}  validation accuracy "
            f"{metrics.get('validation.accuracy', float('nan')):.3f}  "
            f"{data.samples_per_second:,.0f} samples/s",
            highlight=False,
        )
    elif event.type == "training.completed":
        test = data.metrics.get("test", {})
        console.print(
            f"   training.completed  version [bold]{data.version}[/], test accuracy "
            f"[bold]{test.get('accuracy', float('nan')):.4f}[/] in "
            f"{data.duration_seconds:.1f}s"
        )
    elif event.type == "training.failed":
        console.print(f"   [red]training.failed[/] {data.reason}")
    elif event.type in ("model.promoted", "model.rejected"):
        colour = "green" if event.type == "model.promoted" else "yellow"
        console.print(f"   [{colour}]{event.type}[/] {data.model}@{data.version}: {data.reason}")
    elif event.type == "deployment.updated":
        console.print(
            f"   deployment.updated  replica {data.replica} {data.status} "
            f"{data.model}@{data.version}"
        )


def _shifted_digits() -> pa.Table:
    """Version 2 of the digits: the originals plus each image shifted one pixel right."""
    from mlbus.datasets.samples import sample_table

    table = sample_table("digits")
    pixels = [c for c in table.column_names if c != "label"]
    images = np.stack([table.column(c).to_numpy() for c in pixels], axis=1).reshape(-1, 8, 8)
    shifted = np.zeros_like(images)
    shifted[:, :, 1:] = images[:, :, :-1]
    columns = {
        name: np.concatenate([images.reshape(-1, 64)[:, i], shifted.reshape(-1, 64)[:, i]])
        for i, name in enumerate(pixels)
    }
    labels = table.column("label").to_numpy()
    columns["label"] = np.concatenate([labels, labels])
    return pa.table({name: pa.array(values) for name, values in columns.items()}).cast(table.schema)


def _predict(serve: str, rows: np.ndarray) -> tuple[str, list[str]]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ]
    }
    response = httpx.post(f"{serve}/v2/models/{MODEL}/infer", json=body, timeout=10)
    response.raise_for_status()
    answer = response.json()
    labels = next(o for o in answer["outputs"] if o["name"] == "label")["data"]
    return answer["model_version"], [str(x) for x in labels]


def _wait_ready(up: subprocess.Popen[bytes], data_dir: Path, names: set[str], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise DemoFailed(f"`mlbus up` exited with code {up.returncode}; see {log}")
        status = read_status(data_dir)
        if status is not None:
            ready = {s["service"] for s in status["services"] if s["state"] == "ready"}
            if names <= ready:
                return
        time.sleep(0.25)
    raise DemoFailed(f"services not ready within 180s; see {log}")


def _start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "mlbus", "up"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent_guard(),
        )


def _stop(up: subprocess.Popen[bytes], log: Path) -> bool:
    """Ctrl-C to `mlbus up`; True if it stopped cleanly."""
    console.print("\n[bold]stopping `mlbus up`…[/]")
    up.send_signal(signal.SIGINT)
    try:
        code = up.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        code = up.wait()
    console.print(f"   `mlbus up` exited with code {code}; service logs: {log}")
    return code == 0


@dataclass(frozen=True)
class Served:
    """What the demo ended with: the version served and its lineage."""

    version: str
    lineage: Any


def run_demo(pipeline: Path) -> None:
    """The main job end to end (see the module doc); SystemExit(1) if a step failed."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    base = settings()
    root = (base.data_dir / "demo").resolve()
    shutil.rmtree(root, ignore_errors=True)  # every run starts from nothing
    root.mkdir(parents=True)
    started = time.monotonic()
    ports = {"serve": free_port(), "api": free_port(), "metrics": free_port()}
    env = service_env(load_settings(data_dir=root)) | {
        "MLBUS_SERVING__PORT": str(ports["serve"]),
        "MLBUS_API__PORT": str(ports["api"]),
        "MLBUS_STREAMS__METRICS_PORT": str(ports["metrics"]),
        # Short windows, so that the demo sees metrics within seconds.
        "MLBUS_STREAMS__WINDOW_SECONDS": "2",
        "MLBUS_STREAMS__HOPPING_SECONDS": "10",
        "MLBUS_STREAMS__GRACE_SECONDS": "1",
    }
    env.pop("MLBUS_KAFKA_BOOTSTRAP_SERVERS", None)
    up_log = root / "up.log"
    console.rule("[bold]mlbus demo")
    up = _start_up(env, up_log)
    ok = False
    served: Served | None = None
    try:
        served = _run(up, root, ports, up_log, pipeline.resolve())
    except (DemoFailed, MlbusError, httpx.HTTPError) as e:
        console.print(f"\n[bold red]demo failed:[/] {e}")
    finally:
        ok = _stop(up, up_log) and served is not None
    if ok and served is not None:
        restart_log = root / "up-restart.log"
        up = _start_up(env, restart_log)
        try:
            ok = _restarted(up, root, ports, restart_log, served)
        except (DemoFailed, MlbusError, httpx.HTTPError) as e:
            console.print(f"\n[bold red]demo failed:[/] {e}")
            ok = False
        finally:
            ok = _stop(up, restart_log) and ok
    elapsed = time.monotonic() - started
    if not ok:
        console.rule(f"[red]demo failed after {elapsed:.0f}s")
        raise SystemExit(1)
    console.rule(f"[green]demo passed in {elapsed:.0f}s")


def _run(
    up: subprocess.Popen[bytes], root: Path, ports: dict[str, int], up_log: Path, pipeline: Path
) -> Served | None:
    from mlbus.consumers.workflow.definitions import apply
    from mlbus.datasets.registry import DatasetRegistry
    from mlbus.datasets.samples import SAMPLES, sample_table
    from mlbus.datasets.sources import from_table

    _step(1, "mlbus up: the embedded broker and every service, supervised")
    _wait_ready(up, root, {"serve", "api"}, up_log)
    status = read_status(root) or {}
    broker = orjson.loads((root / "broker.json").read_bytes())
    console.print(f"   {'broker':<10} pid {broker['pid']:<7} {broker['bootstrap']} (embedded)")
    for s in status.get("services", []):
        console.print(f"   {s['service']:<10} pid {s['pid']:<7} {s['url'] or ''}")
    cfg: Settings = load_settings(data_dir=root)
    kafka = KafkaConfig.from_settings(cfg)
    serve = f"http://127.0.0.1:{ports['serve']}"
    log = Log(kafka)
    registry: DatasetRegistry | None = None
    try:
        _step(2, f"apply the pipeline {pipeline.name}")
        applied = apply(kafka, pipeline.read_text(), source=str(pipeline), actor="user:demo")
        console.print(f"   {applied.message}", highlight=False)
        policy = applied.pipeline.policy
        bars = ", ".join(f"{t.metric} {t.op} {t.value:g}" for t in policy.thresholds)
        console.print(
            f"   policy {policy.name} v{policy.version}: {bars}; must beat the "
            f"champion's {policy.metric}"
        )

        _step(3, "register the scikit-learn digits sample as dataset version 1")
        store = ObjectStore.from_settings(cfg)
        registry = DatasetRegistry(store, kafka)
        first = registry.register(
            from_table(sample_table("digits"), "sklearn:digits"),
            name="digits",
            label="label",
            tags={"source": "scikit-learn"},
            description=SAMPLES["digits"],
        )
        console.print(
            f"   digits@{first.version[:12]}: {first.num_rows:,} rows → "
            f"dataset.created {first.event_id}"
        )

        _step(4, "the validator checks it, the workflow requests training, a worker trains")
        v1 = _await_promotion(log, timeout=150)

        _step(5, "the model server loads the promoted version")
        _await_loaded(log, v1, serve)

        _step(6, "predictions over HTTP (Open Inference Protocol v2)")
        table = sample_table("digits")
        rows = np.stack(
            [table.column(c).to_numpy() for c in table.column_names if c != "label"], axis=1
        ).astype(np.float32)
        truth = [str(x) for x in table.column("label").to_pylist()]
        version, labels = _predict(serve, rows[:8])
        console.print(f"   POST /v2/models/{MODEL}/infer → version {version}")
        console.print(f"   predicted {labels}\n   truth     {truth[:8]}")

        _step(7, "predictions over Kafka (inference.requests → inference.results)")
        request_id = str(uuid.uuid4())
        with EventProducer(kafka, source="mlbus/demo") as producer:
            producer.publish(
                InferenceRequest(
                    request_id=request_id,
                    model=MODEL,
                    inputs=[
                        Tensor(
                            name="input",
                            shape=[3, 64],
                            datatype="FP32",
                            data=list(rows[8:11].ravel().tolist()),
                        )
                    ],
                )
            )
            producer.flush()
        result: Any = log.wait(
            "inference.results",
            lambda e: e.type == "inference.results" and e.data.request_id == request_id,
            timeout=30,
        ).data
        predicted = next(o.data for o in result.outputs if o.name == "label")
        console.print(
            f"   request {request_id[:8]}… → version {result.version}: {predicted} "
            f"(truth {truth[8:11]})"
        )

        _step(8, "serving metrics from the inference log (stream processors, 2 s windows)")
        with httpx.Client(timeout=10) as client:
            for i in range(0, 400, 8):
                body = {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [8, 64],
                            "datatype": "FP32",
                            "data": rows[i : i + 8].ravel().tolist(),
                        }
                    ]
                }
                client.post(f"{serve}/v2/models/{MODEL}/infer", json=body).raise_for_status()
        metrics: Any = log.wait(
            "serving.metrics",
            lambda e: (
                e.type == "serving.metrics"
                and e.data.model == MODEL
                and e.data.requests > 0
                and e.data.window == "tumbling"
            ),
            timeout=60,
        ).data
        latency = metrics.latency_seconds
        drift = f"max PSI {max(metrics.psi.values()):.3f}" if metrics.psi else metrics.drift_note
        p50, p99 = latency.p50 * 1000, latency.p99 * 1000
        console.print(
            f"   {metrics.model}@{metrics.version} window "
            f"{metrics.window_start:%H:%M:%S}-{metrics.window_end:%H:%M:%S}: "
            f"{metrics.requests} requests, {metrics.errors} errors, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; {drift}"
        )

        _step(9, "register dataset version 2 (the digits plus shifted copies) → retrain")
        second = registry.register(
            from_table(_shifted_digits(), "digits+shifted"),
            name="digits",
            label="label",
            tags={"source": "scikit-learn", "augmented": "shift-right"},
            parents=[f"digits@{first.version}"],
        )
        console.print(
            f"   digits@{second.version[:12]}: {second.num_rows:,} rows, parent "
            f"digits@{first.version[:12]}"
        )
        v2 = _await_promotion(log, timeout=180, after=v1)
        _await_loaded(log, v2, serve)
        version, labels = _predict(serve, rows[:8])
        console.print(f"   the server now answers with version {version}: {labels}")

        _step(10, f"lineage of the serving model {MODEL}@{v2}, from the lineage store")
        lineage = _lineage(cfg, kafka, root, v2)
        return Served(v2, lineage) if lineage is not None and version == v2 else None
    finally:
        log.stop()
        if registry is not None:
            registry.close()


def _await_promotion(log: Log, *, timeout: float, after: str | None = None) -> str:
    decision = log.wait(
        "a promotion decision",
        lambda e: (
            e.type in ("model.promoted", "model.rejected")
            and e.data.model == MODEL
            and e.data.version != after
        ),
        timeout=timeout,
        show=_show_training,
    )
    data: Any = decision.data
    if decision.type == "model.rejected":
        raise DemoFailed(f"{MODEL}@{data.version} was rejected: {data.reason}")
    evidence = orjson.dumps(data.evidence).decode()
    policy = f"{data.policy.name} v{data.policy.version}" if data.policy else "-"
    console.print(
        f"   policy {policy}, actor {data.actor}, evidence {evidence[:160]}", highlight=False
    )
    return str(data.version)


def _await_loaded(log: Log, version: str, serve: str) -> None:
    log.wait(
        "deployment.updated",
        lambda e: (
            e.type == "deployment.updated"
            and e.data.model == MODEL
            and e.data.version == version
            and e.data.status == "loaded"
        ),
        timeout=60,
        show=_show_training,
    )
    deadline = time.monotonic() + 10
    while _predict(serve, np.zeros((1, 64), np.float32))[0] != version:
        if time.monotonic() > deadline:
            raise DemoFailed(f"the server does not answer with {version}")
        time.sleep(0.1)


def _lineage(cfg: Settings, kafka: KafkaConfig, root: Path, version: str) -> Any:
    """The lineage of the serving version, as the projector rebuilt it from the log (a tree,
    and SVG/DOT files in the data dir), then its audit trail verified against the log: the
    lineage, or None if the audit found something amiss."""
    from mlbus.cli.lineage import _upstream_tree
    from mlbus.cli.svg import render_svg
    from mlbus.consumers.lineage.audit import plan, topics_of, verify
    from mlbus.consumers.lineage.graph import to_dot, upstream_graph
    from mlbus.consumers.lineage.queries import LineageQueries
    from mlbus.consumers.lineage.store import LineageStore
    from mlbus.kafka.reader import read_log

    queries = LineageQueries(LineageStore.open(cfg.metadata_url))
    deadline = time.monotonic() + 60
    while queries.serving(MODEL) != version:  # the projector is a consumer like any other
        if time.monotonic() > deadline:
            raise DemoFailed(f"the lineage store does not show {MODEL}@{version} serving")
        time.sleep(0.25)
    up = queries.upstream(MODEL, version)
    console.print(_upstream_tree(up))
    graph = upstream_graph(up)
    svg, dot = root / f"lineage-{MODEL}.svg", root / f"lineage-{MODEL}.dot"
    svg.write_text(render_svg(graph.nodes, graph.edges, f"lineage of {MODEL}@{version}"))
    dot.write_text(to_dot(graph, f"{MODEL}@{version}"))
    console.print(f"   graph written to {svg} (and {dot.name})")

    _step(11, f"audit trail of {MODEL}@{version}, verified against the log")
    report = plan(queries.store, MODEL, version)
    report = verify(report, read_log(kafka, topics_of(report)))
    for e in report.events:
        mark = "[green]✓[/]" if e.status == "verified" else f"[red]✗ {e.status}[/]"
        console.print(f"   {mark} {e.time} {e.type:<20} {e.event_id}", highlight=False)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts.items()))
    console.print(f"   {len(report.events)} events ({counts})")
    return up if report.ok else None


def _restarted(
    up: subprocess.Popen[bytes], root: Path, ports: dict[str, int], log: Path, served: Served
) -> bool:
    """The platform started again on the same data dir: the journal brings the log back, and
    the same champion is served with the same lineage — no run, decision or row redone."""
    from mlbus.consumers.lineage.queries import LineageQueries
    from mlbus.consumers.lineage.store import LineageStore

    _step(12, "restart the platform on the same data dir: the journal brings the log back")
    _wait_ready(up, root, {"serve", "api", "lineage"}, log)
    broker = orjson.loads((root / "broker.json").read_bytes())
    console.print(f"   {'broker':<10} pid {broker['pid']:<7} {broker['bootstrap']} (embedded)")
    for s in (read_status(root) or {}).get("services", []):
        console.print(f"   {s['service']:<10} pid {s['pid']:<7} {s['url'] or ''}")
    for line in log.read_text(errors="replace").splitlines():
        if "journal: restored" in line:
            console.print(f"   {line.strip()}", highlight=False)
    serve = f"http://127.0.0.1:{ports['serve']}"
    deadline = time.monotonic() + 60
    while True:  # the server loads the champion again from the restored log
        with contextlib.suppress(httpx.HTTPError):
            version = _predict(serve, np.zeros((1, 64), np.float32))[0]
            if version == served.version:
                break
        if time.monotonic() > deadline:
            raise DemoFailed(f"after the restart the server does not answer with {served.version}")
        time.sleep(0.25)
    console.print(f"   the server answers with version {version} again (the same champion)")
    cfg = load_settings(data_dir=root)
    queries = LineageQueries(LineageStore.open(cfg.metadata_url))
    again = queries.upstream(MODEL, served.version)
    before = served.lineage
    # Deployments differ by design: the restarted server is a new replica and reports its
    # load; the rest (the run, its datasets, decisions, provenance) must be as it was.
    same = (again.run, again.datasets, again.decisions, again.provenance) == (
        before.run,
        before.datasets,
        before.decisions,
        before.provenance,
    )
    if not same:
        raise DemoFailed(f"the lineage of {MODEL}@{served.version} changed across the restart")
    console.print(
        f"   the same lineage: run {again.run.run_id}, {len(again.datasets)} dataset "
        f"version(s), {len(again.decisions)} decision(s), as before the restart"
    )
    return True

"""mlbus's model server against its peers, on the same heavy torch model, in one run.

    .venv/bin/python bench/serving_peers.py [--seconds S] [--clients 1,16,64]
        [--peers kserve,mlserver,litserve] [--peer-python PEER=PATH ...] [--json]

The model is bench/peers/heavy_model.py (a CNN stem and a wide dense head, 28x28 inputs,
weights from a fixed seed; its single-sample forward time is printed and must be >= 2 ms).
Each server runs with its own dynamic batching switched on:

- mlbus: micro-batching (serving.max_batch_size, serving.max_wait_us), served in this process
  as bench/serving.py does (uvicorn thread, embedded Tansu broker, the artifact through the
  object store and `model.promoted`);
- KServe's Python model server (`kserve`): the Open Inference Protocol; its batcher is the
  KServe agent's (a Go sidecar in Kubernetes), not in the package: one predict per request;
- Seldon's MLServer: a custom runtime with adaptive batching (max_batch_size, max_batch_time);
- LitServe: max_batch_size and batch_timeout on its LitAPI; no OIP, its native JSON route
  takes the OIP request body at the same path.

The peers run in their own environments (bench/peers/requirements-serving.txt for kserve and
litserve, requirements-mlserver.txt; never in mlbus's dependencies), each found through
`--peer-python PEER=PATH`, else MLBUS_BENCH_<PEER>_PYTHON, else .bench-peers/<env>/bin/python;
a peer without one, or that does not start, is reported and skipped. Every
server is up for the whole run, and each load (1, 16, 64 closed-loop clients on raw HTTP/1.1
keep-alive connections, one load generator process: bench/serving.py's) goes to each server
in turn, so that the machine's load falls on all alike. Each server gets the same torch
intra-op threads (mlbus's own choice: the usable cores).

Each point is measured `--repeat` times (3 by default), each repeat going through the
servers in a rotated order, and reported as the median of the repeats: one 10 s measurement
at 1 client moved by a fifth between runs on a shared 2-core machine, more than the
difference the target asks about.

Targets: at 64 clients mlbus >= 1.5x the best peer's requests/s with a p99 no worse than
that peer's; at 1 client mlbus's requests/s no worse than the best peer's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import Figure, Figures, print_report, publish_summary, render_table  # noqa: E402
from bench.serving import (  # noqa: E402
    Running,
    free_port,
    make_artifact,
    measure,
    single_forward_ms,
)

PEERS_DIR = ROOT / "bench" / "peers"
MODEL = "wide-cnn"
FAMILY = "bench-heavy"
PATH = f"/v2/models/{MODEL}/infer"
PEERS = ("kserve", "mlserver", "litserve")
#: Each peer's environment under .bench-peers/ (MLServer's starlette pin conflicts with kserve's).
ENVIRONMENTS = {"kserve": "serving", "litserve": "serving", "mlserver": "mlserver"}


def heavy_model() -> Any:
    """bench/peers/heavy_model.py, loaded from its file (the peers' scripts do the same)."""
    spec = importlib.util.spec_from_file_location("heavy_model", PEERS_DIR / "heavy_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def register_family(hm: Any) -> None:
    from mlbus.families import FAMILIES, family

    if FAMILY in FAMILIES:
        return

    @family(FAMILY, defaults={}, bounds={}, description="bench: bench/peers/heavy_model.py")
    def _heavy(n_features: int, n_classes: int, p: Mapping[str, Any]) -> Any:
        return hm.build()


@dataclass
class Report(Figures):
    figures: dict[str, Figure]
    setup: dict[str, Any]


# -- the peers (subprocesses in their environment) -----------------------------------------


class Peer:
    """One peer model server, started in the peers' environment and stopped at the end."""

    def __init__(self, name: str, python: str, args: argparse.Namespace, tmp: Path) -> None:
        self.name = name
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.torch_threads),
            "MKL_NUM_THREADS": str(args.torch_threads),
            "PYTHONPATH": str(PEERS_DIR),
        }
        if name == "kserve":
            cmd = [python, str(PEERS_DIR / "kserve_server.py"), str(port)]
            self.settings = "one uvicorn worker; no batching in the package (agent sidecar's)"
        elif name == "litserve":
            cmd = [
                python, str(PEERS_DIR / "litserve_server.py"), str(port), str(args.max_batch),
                str(args.litserve_timeout),
            ]  # fmt: skip
            self.settings = (
                f"max_batch_size={args.max_batch} batch_timeout={args.litserve_timeout}s "
                "workers_per_device=1"
            )
        elif name == "mlserver":
            root = tmp / "mlserver"
            (root / MODEL).mkdir(parents=True)
            server = {
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "parallel_workers": args.mlserver_workers,
                "logging_level": "WARNING",
            }
            model = {
                "name": MODEL,
                "implementation": "mlserver_heavy.runtime.Heavy",
                "max_batch_size": args.max_batch,
                "max_batch_time": args.mlserver_batch_time,
            }
            (root / "settings.json").write_text(json.dumps(server))
            (root / MODEL / "model-settings.json").write_text(json.dumps(model))
            cmd = [str(Path(python).parent / "mlserver"), "start", str(root)]
            self.settings = (
                f"max_batch_size={args.max_batch} max_batch_time={args.mlserver_batch_time}s "
                f"parallel_workers={args.mlserver_workers}"
            )
        else:
            raise ValueError(f"unknown peer {name}")
        self.log = open(tmp / f"{name}.log", "w+b")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            cmd,
            cwd=tmp,  # what a peer writes in its working directory (MLServer: .metrics/)
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its worker processes stop with it
        )

    def wait_ready(self, body: bytes, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            try:
                r = httpx.post(self.url + PATH, content=body, timeout=10,
                               headers={"content-type": "application/json"})  # fmt: skip
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout} s: {self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-1500:]

    def stop(self) -> None:
        group = self.process.pid  # the leader of its own process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # workers left behind by the leader
        self.process.wait(10)
        self.log.close()


def peer_versions(python: str) -> str:
    """'kserve 0.21.0, torch 2.13.0+cpu': what the peer's environment has."""
    code = (
        "import importlib.metadata as m\n"
        "for p in ('kserve', 'mlserver', 'litserve', 'torch'):\n"
        "    try: print(p, m.version(p))\n"
        "    except m.PackageNotFoundError: pass"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return ", ".join(done.stdout.split("\n")[:-1])


def find_python(peer: str, given: Mapping[str, str]) -> str | None:
    """The peer's environment's python: `--peer-python PEER=PATH`, else
    MLBUS_BENCH_<PEER>_PYTHON, else .bench-peers/<its environment>/bin/python."""
    default = str(ROOT / ".bench-peers" / ENVIRONMENTS[peer] / "bin" / "python")
    for candidate in (
        given.get(peer),
        os.environ.get(f"MLBUS_BENCH_{peer.upper()}_PYTHON"),
        default,
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Any) -> Report:
    import orjson
    import torch

    from bench.serving import promote
    from mlbus import __version__ as mlbus_version
    from mlbus.broker import EmbeddedBroker
    from mlbus.kafka.admin import apply_topics
    from mlbus.kafka.config import KafkaConfig
    from mlbus.kafka.producer import EventProducer
    from mlbus.runtime import usable_cores
    from mlbus.serving.server import ModelServer
    from mlbus.settings import ServingSettings
    from mlbus.storage import ObjectStore

    args.torch_threads = args.torch_threads or usable_cores()
    torch.set_num_threads(args.torch_threads)
    hm = heavy_model()
    register_family(hm)
    report = Report(
        figures={},
        setup={
            "seconds_per_point": args.seconds,
            "repeats": args.repeat,
            "torch_threads": args.torch_threads,
            "uptime_before": os.popen("uptime").read().strip(),
            "versions": {"mlbus": f"mlbus {mlbus_version}, torch {torch.__version__}"},
            "settings": {},
            "skipped": {},
        },
    )
    n_features = hm.N_FEATURES
    rows = np.random.default_rng(0).random((1, n_features), dtype=np.float32)
    tensor = {"name": "input", "shape": [1, n_features], "datatype": "FP32",
              "data": rows.ravel().tolist()}  # fmt: skip
    body = orjson.dumps({"inputs": [tensor]})
    servers: dict[str, str] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started: list[Peer] = []
        for name in args.peers:
            python = find_python(name, args.peer_python)
            if python is None:
                report.setup["skipped"][name] = "no environment (see bench/peers/README.md)"
                continue
            report.setup["versions"][name] = peer_versions(python)
            peer = Peer(name, python, args, tmp)
            stack.callback(peer.stop)
            started.append(peer)
        for peer in started:
            try:
                peer.wait_ready(body)
            except RuntimeError as e:
                report.setup["skipped"][peer.name] = str(e)
                log(f"{peer.name} skipped: {e}")
                continue
            servers[peer.name] = peer.url
            report.setup["settings"][peer.name] = peer.settings
        broker = stack.enter_context(EmbeddedBroker(tmp / "broker", record=False))
        kafka = replace(
            KafkaConfig(bootstrap=broker.bootstrap, embedded=True), topic_prefix="bench."
        )
        apply_topics(kafka)
        store = ObjectStore((tmp / "objects").as_uri())
        producer = stack.enter_context(EventProducer(kafka, source="bench"))
        artifact, model = make_artifact(store, MODEL, FAMILY, hm.SIDE, {})
        # One torch thread, as bench/serving.py measures it: the model's own cost, not how
        # two threads fare on a loaded machine.
        torch.set_num_threads(1)
        report.setup["single_forward_ms"] = round(single_forward_ms(model, n_features), 2)
        torch.set_num_threads(args.torch_threads)
        log(f"single-sample forward {report.setup['single_forward_ms']} ms")
        promote(producer, MODEL, "1", artifact)
        config = ServingSettings(
            replica="bench-peers",
            max_batch_size=args.max_batch,
            max_wait_us=args.max_wait_us,
            log_sample_rate=args.log_sample_rate,
        )
        server = ModelServer(
            kafka, store, config, stream_group=None, torch_threads=args.torch_threads
        )
        mlbus = Running(server, free_port())
        stack.callback(mlbus.stop)
        mlbus.wait_version(MODEL, "1")
        servers["mlbus"] = mlbus.url
        report.setup["settings"]["mlbus"] = (
            f"max_batch_size={args.max_batch} max_wait_us={args.max_wait_us} forward threads "
            f"x torch threads {server.forward_workers} x {server.torch_threads}, inference log "
            f"sample rate {args.log_sample_rate}"
        )
        names = list(servers)
        for clients in args.clients:
            results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for repeat in range(args.repeat):
                # Each repeat starts with the next server: none is always measured first
                # (on a machine fresh from the previous point) or right after a given peer.
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    result = measure(servers[name] + PATH, body, clients, args.seconds)
                    results[name].append(result)
                    log(
                        f"{clients} clients {name} (repeat {repeat + 1}): {result['rps']:.0f} "
                        f"req/s p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms "
                        f"errors {result['errors']}"
                    )
            for name in names:
                result = median_of(results[name])
                report.add(
                    Figure(f"{clients}/{name}", f"{clients:>2} clients {name}", result["rps"],
                           detail=result, unit="req/s")
                )  # fmt: skip
            judge(report, clients, [n for n in servers if n != "mlbus"])
        report.setup["uptime_after"] = os.popen("uptime").read().strip()
        report.setup["failed_requests"] = sum(f.detail["errors"] for f in report.figures.values())
    return report


def median_of(results: list[dict[str, float]]) -> dict[str, float]:
    """A point over its repeats: the median of each figure (requests/s, p50, p99 each on its
    own), the requests and errors summed; every repeat's requests/s kept."""
    out = {k: statistics.median(r[k] for r in results) for k in ("rps", "p50_ms", "p99_ms")}
    out["requests"] = sum(r["requests"] for r in results)
    out["errors"] = sum(r["errors"] for r in results)
    out["repeats_rps"] = [round(r["rps"], 1) for r in results]
    return out


def judge(report: Report, clients: int, peers: list[str]) -> None:
    """mlbus against the best peer (most requests/s) at this load; the targets at 1 and 64."""
    if not peers:
        return
    best = max(peers, key=lambda n: report.figures[f"{clients}/{n}"].value)
    for name in peers:
        report.figures[f"{clients}/{name}"].detail["best"] = name == best
    ours = report.figures[f"{clients}/mlbus"]
    ours.baseline_key = f"{clients}/{best}"
    ratio = report.ratio(ours) or 0.0
    theirs = report.figures[ours.baseline_key]
    if clients == 64:
        ours.target = f">= 1.5x {best}, p99 <= its"
        ours.ok = ratio >= 1.5 and ours.detail["p99_ms"] <= theirs.detail["p99_ms"]
    elif clients == 1:
        ours.target = f">= 1x {best}"
        ours.ok = ratio >= 1.0


def table(report: Report) -> str:
    header = ["figure", "value", "p50 ms", "p99 ms", "vs best peer", "target", "each repeat"]
    rows = []
    for f in report.figures.values():
        ratio = report.ratio(f)
        status = "" if f.ok is None else (" ok" if f.ok else " MISSED")
        rows.append(
            [
                f.label + (" (best peer)" if f.detail.get("best") else ""),
                f"{f.value:,.0f} {f.unit}",
                f"{f.detail['p50_ms']:.1f}",
                f"{f.detail['p99_ms']:.1f}",
                f"{ratio:.2f}x" if ratio else "",
                f.target + status if f.target else "",
                " ".join(f"{v:.0f}" for v in f.detail["repeats_rps"]),
            ]
        )
    s = report.setup
    lines = [
        "model servers on one heavy torch model (bench/peers/heavy_model.py, single-sample "
        f"forward {s['single_forward_ms']} ms), {s['seconds_per_point']} s per point x "
        f"{s['repeats']} repeats (median; each repeat in a rotated order), "
        f"closed-loop clients, {s['torch_threads']} torch threads each",
        *(f"versions {k}: {v}" for k, v in s["versions"].items()),
        *(f"settings {k}: {v}" for k, v in s["settings"].items()),
        *(f"skipped {k}: {v}" for k, v in s["skipped"].items()),
        f"uptime before: {s['uptime_before']}",
        f"uptime after:  {s['uptime_after']}",
        "",
        *render_table(header, rows, right=frozenset({1, 2, 3, 4})),
        "",
        f"failed requests: {s['failed_requests']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured point")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated")
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="PEER=PATH",
        help="a peer's environment's python (else MLBUS_BENCH_<PEER>_PYTHON, else .bench-peers/)",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="every server's batch limit")
    parser.add_argument("--max-wait-us", type=int, default=2000, help="mlbus's batching wait")
    parser.add_argument("--mlserver-batch-time", type=float, default=0.002, help="seconds")
    parser.add_argument("--mlserver-workers", type=int, default=1, help="parallel_workers")
    parser.add_argument("--litserve-timeout", type=float, default=0.002, help="batch_timeout s")
    parser.add_argument("--log-sample-rate", type=float, default=1.0, help="mlbus inference log")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: the usable cores")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per point (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.peers = [p for p in args.peers.split(",") if p]
    args.peer_python = dict(p.split("=", 1) for p in args.peer_python)

    def log(message: str) -> None:
        print(f"[bench/serving_peers] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = run(args, log)
    publish_summary("serving_peers", report)
    report.setup["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_report(report, table(report), args.json, "every server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model server throughput and latency, micro-batching against a naive server, in one run.

    .venv/bin/python bench/serving.py [--seconds S] [--clients 1,16,64] [--promotions N]
                                       [--json]

Two servers of the same FastAPI app run in this process (uvicorn threads) on one embedded
Tansu broker: "naive" (`batching=False`: one forward pass per request, in a thread pool like
a sync FastAPI endpoint's) and "mlbus" (dynamic micro-batching, serving.max_batch_size /
max_wait_us). For two models they answer closed-loop clients (each sends its next request
when the previous one is answered; raw HTTP/1.1 keep-alive connections, in a separate
process so that the load generator does not share the servers' GIL) at 1, 16 and 64
concurrent clients: requests/s, p50 and p99 latency, and mlbus/naive ratio of requests/s.

Each server sets torch's intra-op threads of its own forward threads (serving/server.py):
the cores shared among them, so both use every core and neither oversubscribes them (naive:
six pool threads, one torch thread each; mlbus: serving.server.PIPELINE forward threads, one
batch in flight each, the cores divided among them: one thread, a torch thread per core).
`--forward-threads N` sets both to N; `--torch-threads` is the process default, which the
single-sample forward time is measured with.

- digits: the built-in `cnn` family on 8x8 digits (64 features), as the trainer builds it;
- wide-cnn: a heavier image model registered here (`@family`), 28x28 synthetic images; its
  single-sample forward time on CPU is measured and printed (it must be >= 2 ms, so that
  batching, not HTTP parsing, decides).

Weights are random (throughput does not depend on them); artifacts go through the real
path: safetensors + card on the object store, `model.promoted`, load and verify.

Promotion-to-serving: N promotions of the digits model (new version each time), each timed
from `model.promoted` produced (flushed) to the first response from the new version, with a
client polling the mlbus server.

A large request beside a small one (`--large-rows`, 65,000 by default; 0 skips it): the
digits model's one-row latency alone (the baseline), and again while one 65,000-row request
(8.3 MB of JSON, under the default body limit) runs on the same server; the large request is
split into batches that take turns with the one-row requests (docs/serving.md, "Fair
batching"). Its "batch window" is a full batch's latency alone (max_batch rows): the one-row
request's median delay beside the large one should stay within 2 windows.

Targets: wide-cnn at 64 clients >= 4x naive; digits p99 < 25 ms at 16 clients;
promotion-to-serving p50 < 1 s; zero failed requests; one-row delay beside a 65,000-row
request <= 2 batch windows (median).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import Figure, Figures, print_report, publish_summary, render_table

WIDE = "wide-cnn"
DIGITS = "digits"


def register_wide_family() -> None:
    from torch import nn

    from mlbus.families import FAMILIES, family

    if WIDE in FAMILIES:
        return

    from bench.peers.heavy_model import WideCNN

    @family(
        WIDE,
        defaults={"channels": 16, "hidden": 3072},
        bounds={"channels": (1, 512), "hidden": (1, 16384)},
        description="bench: CNN stem + wide dense head for 28x28 images",
    )
    def _wide(n_features: int, n_classes: int, p: Mapping[str, Any]) -> nn.Module:
        return WideCNN(math.isqrt(n_features), n_classes, int(p["channels"]), int(p["hidden"]))


@dataclass
class Report(Figures):
    figures: dict[str, Figure]
    setup: dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- load generator (a separate process) ---------------------------------------------------


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on a kept-alive connection; the response's status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


def _load(url: str, body: bytes, clients: int, seconds: float, out: Any) -> None:
    """Closed-loop clients on raw HTTP/1.1 keep-alive connections: a load generator this
    cheap (httpx costs more CPU per request than the server) keeps the servers the bottleneck.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def main() -> tuple[int, int, list[float]]:
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal errors
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                await _post(reader, writer, request)  # warm-up, not counted
                while time.perf_counter() < stop_at:
                    started = time.perf_counter()
                    try:
                        ok = await _post(reader, writer, request) == 200
                    except (OSError, asyncio.IncompleteReadError, ValueError):
                        ok = False
                        writer.close()
                        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
            finally:
                writer.close()

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return len(latencies), errors, [*latencies, time.perf_counter() - began]

    n, errors, values = asyncio.run(main())
    out.put((n, errors, values))


def measure(url: str, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_load, args=(url, body, clients, seconds, queue))
    process.start()
    n, errors, values = queue.get(timeout=seconds + 300)
    process.join(30)
    elapsed, latencies = values[-1], values[:-1]
    return {
        "rps": n / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "requests": n,
        "errors": errors,
    }


# -- the servers ---------------------------------------------------------------------------


class Running:
    def __init__(self, server: Any, port: int) -> None:
        import uvicorn

        from mlbus.serving.app import create_app

        self.server = server
        self.url = f"http://127.0.0.1:{port}"
        self._uv = uvicorn.Server(
            uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="error")
        )
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not (self._uv.started and server.ready):
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def wait_version(self, model: str, version: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            current = self.server.registry.current(model)
            if current is not None and current.version == version:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} {version} not served")
            time.sleep(0.02)

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(30)


def make_artifact(store: Any, name: str, family: str, side: int, params: dict[str, Any]) -> Any:
    import torch

    from mlbus import artifacts
    from mlbus.families import build, hyperparameters
    from mlbus.ml.card import ModelCard
    from mlbus.schemas.base import DatasetRef
    from mlbus.schemas.training import Artifact

    torch.manual_seed(0)
    features = [f"pixel_{i}" for i in range(side * side)]
    hp = hyperparameters(family, params)
    model = build(family, len(features), 10, hp).eval()
    card = ModelCard(
        family=family,
        hyperparameters=hp,
        features=features,
        feature_types=dict.fromkeys(features, "double"),
        label="digit",
        classes=[str(i) for i in range(10)],
        mean=[0.0] * len(features),
        std=[1.0] * len(features),
        metrics={},
        run_id=f"bench-{name}",
        dataset=DatasetRef(name=name, version="synthetic"),
    )
    return Artifact(**artifacts.save(store, f"models/{name}", model, card)), model


def single_forward_ms(model: Any, n_features: int, repeat: int = 50) -> float:
    import torch

    x = torch.randn(1, n_features)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


def promote(producer: Any, model: str, version: str, artifact: Any) -> None:
    from mlbus.schemas.models import ModelPromoted

    producer.publish(
        ModelPromoted(
            model=model, version=version, reason="bench", actor="bench", artifact=artifact
        )
    )
    producer.flush()


def run(args: argparse.Namespace, log: Any) -> Report:
    import orjson
    import torch

    from mlbus.broker import EmbeddedBroker
    from mlbus.kafka.admin import apply_topics
    from mlbus.kafka.config import KafkaConfig
    from mlbus.kafka.producer import EventProducer
    from mlbus.serving.server import ModelServer
    from mlbus.settings import ServingSettings
    from mlbus.storage import ObjectStore

    # The process default: the single-sample measurement below and the loads' warm-up
    # passes. Each server sets its forward threads' own (see the module doc).
    torch.set_num_threads(args.torch_threads)
    register_wide_family()
    report = Report(
        figures={}, setup={"seconds_per_point": args.seconds, "torch_threads": args.torch_threads}
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker = stack.enter_context(EmbeddedBroker(tmp / "broker", record=False))
        kafka = replace(
            KafkaConfig(bootstrap=broker.bootstrap, embedded=True), topic_prefix="bench."
        )
        apply_topics(kafka)
        store = ObjectStore((tmp / "objects").as_uri())
        producer = stack.enter_context(EventProducer(kafka, source="bench"))
        models = {
            DIGITS: (8, *make_artifact(store, DIGITS, "cnn", 8, {})),
            WIDE: (28, *make_artifact(store, WIDE, WIDE, 28, {})),
        }
        for name, (side, artifact, model) in models.items():
            promote(producer, name, "1", artifact)
            report.setup[f"{name}_single_forward_ms"] = round(
                single_forward_ms(model, side * side), 2
            )
            log(f"{name}: single-sample forward {report.setup[f'{name}_single_forward_ms']} ms")
        servers = {}
        for mode, batching in (("naive", False), ("mlbus", True)):
            config = ServingSettings(
                replica=f"bench-{mode}",
                max_batch_size=args.max_batch,
                max_wait_us=args.max_wait_us,
                log_sample_rate=args.log_sample_rate,
            )
            server = ModelServer(
                kafka,
                store,
                config,
                batching=batching,
                stream_group=None,
                torch_threads=args.forward_threads or None,
            )
            report.setup[f"{mode}_forward_threads"] = [server.forward_workers, server.torch_threads]
            servers[mode] = Running(server, free_port())
            stack.callback(servers[mode].stop)
        for name, (side, _, _) in models.items():
            if name not in args.models.split(","):
                continue
            rng = np.random.default_rng(0)
            rows = rng.random((1, side * side), dtype=np.float32)
            tensor = {
                "name": "input",
                "shape": [1, side * side],
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
            body = orjson.dumps({"inputs": [tensor]})
            for clients in args.clients:
                for mode in ("naive", "mlbus"):
                    url = f"{servers[mode].url}/v2/models/{name}/infer"
                    result = measure(url, body, clients, args.seconds)
                    key = f"{name}/{clients}/{mode}"
                    log(
                        f"{key}: {result['rps']:.0f} req/s p50 {result['p50_ms']:.1f} ms "
                        f"p99 {result['p99_ms']:.1f} ms errors {result['errors']}"
                    )
                    target, ok = "", None
                    if mode == "mlbus" and name == WIDE and clients == 64:
                        target = ">= 4x naive"
                    if mode == "mlbus" and name == DIGITS and clients == 16:
                        target, ok = "p99 < 25 ms", result["p99_ms"] < 25
                    figure = report.add(
                        Figure(
                            key,
                            f"{name} {clients:>2} clients {mode}",
                            result["rps"],
                            baseline_key=f"{name}/{clients}/naive" if mode == "mlbus" else None,
                            target=target,
                            ok=ok,
                            detail=result,
                            unit="req/s",
                        )
                    )
                    if target == ">= 4x naive":
                        figure.ok = (report.ratio(figure) or 0) >= 4
        report.setup["failed_requests"] = sum(f.detail["errors"] for f in report.figures.values())
        # Promotion to serving, on the mlbus server (digits).
        mlbus = servers["mlbus"]
        side, artifact, _ = models[DIGITS]
        body = orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
                ]
            }
        )
        if args.large_rows:
            beside_large(report, mlbus.url, args.large_rows, args.max_batch, log)
        delays = promotion_delays(mlbus.url, producer, artifact, args.promotions, body)
        report.setup["promotion_delays_ms"] = [round(d * 1000, 1) for d in delays]
        p50, p99 = percentile(delays, 50) * 1000, percentile(delays, 99) * 1000
        report.add(
            Figure(
                "promotion/p50",
                "promotion to serving p50",
                p50,
                unit="ms",
                target="< 1000 ms",
                ok=p50 < 1000,
            )
        )
        report.add(Figure("promotion/p99", "promotion to serving p99", p99, unit="ms"))
        for mode in ("naive", "mlbus"):
            servers[mode].stop()
    return report


def beside_large(report: Report, url: str, rows: int, max_batch: int, log: Any) -> None:
    """One-row latency alone and beside a `rows`-row request, on the digits model."""
    import httpx
    import orjson

    def doc(n: int, value: int) -> bytes:  # integers: 65,000 rows are 8.3 MB, under the limit
        x = [{"name": "input", "shape": [n, 64], "datatype": "FP32", "data": [value] * (n * 64)}]
        return orjson.dumps({"inputs": x})

    one, batch, large = doc(1, 3), doc(max_batch, 3), doc(rows, 5)
    path = f"/v2/models/{DIGITS}/infer"
    headers = {"content-type": "application/json"}

    def latencies(client: httpx.Client, body: bytes, n: int) -> list[float]:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            r = client.post(path, content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"a request failed: {r.text[:200]}")
            out.append(time.perf_counter() - started)
        return out

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "p50_ms": percentile(values, 50) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
            "max_ms": max(values) * 1000,
            "n": len(values),
        }

    with httpx.Client(base_url=url, timeout=600) as client:
        latencies(client, one, 20)  # warm
        alone = stats(latencies(client, one, 200))
        window = stats(latencies(client, batch, 100))
        beside: list[float] = []
        took: list[float] = []

        def ask_large() -> None:
            with httpx.Client(base_url=url, timeout=600) as big:
                started = time.perf_counter()
                r = big.post(path, content=large, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"the large request failed: {r.text[:200]}")
                took.append(time.perf_counter() - started)

        thread = threading.Thread(target=ask_large)
        thread.start()
        time.sleep(0.05)  # the large request is on its way
        while thread.is_alive():
            beside.extend(latencies(client, one, 1))
        thread.join()
    if not took:
        raise RuntimeError("the large request did not finish")
    near = stats(beside)
    delay = near["p50_ms"] - alone["p50_ms"]
    ok = delay <= 2 * window["p50_ms"]
    log(
        f"one row alone p50 {alone['p50_ms']:.1f} ms; beside {rows} rows p50 "
        f"{near['p50_ms']:.1f} ms p99 {near['p99_ms']:.1f} ms max {near['max_ms']:.0f} ms "
        f"({near['n']:.0f} requests); batch window {window['p50_ms']:.1f} ms; large request "
        f"{took[0] * 1000:.0f} ms"
    )
    report.add(Figure("fair/alone", "1 row alone", alone["p50_ms"], unit="ms", detail=alone))
    report.add(
        Figure("fair/window", f"{max_batch} rows alone (window)", window["p50_ms"], unit="ms",
               detail=window)
    )  # fmt: skip
    report.add(
        Figure(
            "fair/beside",
            f"1 row beside {rows:,} rows",
            near["p50_ms"],
            baseline_key="fair/alone",
            unit="ms",
            detail=near,
            target="delay <= 2 windows",
            ok=ok,
        )
    )
    report.setup["large_request_ms"] = round(took[0] * 1000, 1)
    report.setup["one_row_beside_large_delay_ms"] = round(delay, 2)


def promotion_delays(url: str, producer: Any, artifact: Any, n: int, body: bytes) -> list[float]:
    import httpx

    delays = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(n):
            version = f"p{i + 2}"
            started = time.perf_counter()
            promote(producer, DIGITS, version, artifact)
            while True:
                r = client.post(f"/v2/models/{DIGITS}/infer", content=body)
                if r.status_code != 200:
                    raise RuntimeError(f"a request failed during a promotion: {r.text}")
                if r.json()["model_version"] == version:
                    break
                if time.perf_counter() - started > 60:
                    raise RuntimeError(f"{version} never served")
            delays.append(time.perf_counter() - started)
    return delays


def table(report: Report) -> str:
    header = ["figure", "value", "p50 ms", "p99 ms", "ratio", "target"]
    rows = []
    for f in report.figures.values():
        ratio = report.ratio(f)
        status = "" if f.ok is None else (" ok" if f.ok else " MISSED")
        rows.append(
            [
                f.label,
                f"{f.value:,.0f} {f.unit}" if f.unit != "ms" else f"{f.value:.0f} ms",
                f"{f.detail['p50_ms']:.1f}" if f.detail else "",
                f"{f.detail['p99_ms']:.1f}" if f.detail else "",
                f"{ratio:.2f}x" if ratio else "",
                f.target + status if f.target else "",
            ]
        )
    naive, mlbus = report.setup["naive_forward_threads"], report.setup["mlbus_forward_threads"]
    lines = [
        "mlbus model server: micro-batching vs one forward pass per request "
        f"({report.setup['seconds_per_point']} s per point, closed-loop clients; forward "
        f"threads x torch threads: naive {naive[0]} x {naive[1]}, mlbus {mlbus[0]} x {mlbus[1]})",
        f"single-sample forward: digits {report.setup[f'{DIGITS}_single_forward_ms']} ms, "
        f"wide-cnn {report.setup[f'{WIDE}_single_forward_ms']} ms",
        "",
        *render_table(header, rows, right=frozenset({1, 2, 3, 4})),
        "",
        f"failed requests: {report.setup['failed_requests']}",
        f"promotion delays (ms): {report.setup['promotion_delays_ms']}",
    ]
    if "large_request_ms" in report.setup:
        lines.append(
            f"large request: {report.setup['large_request_ms']} ms; one-row median delay "
            f"beside it: {report.setup['one_row_beside_large_delay_ms']} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured point")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated")
    parser.add_argument("--promotions", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-us", type=int, default=2000)
    parser.add_argument("--log-sample-rate", type=float, default=1.0, help="inference log")
    parser.add_argument("--models", default=f"{DIGITS},{WIDE}", help="comma-separated")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="process default (single-sample forward time)"
    )
    parser.add_argument(
        "--forward-threads",
        type=int,
        default=0,
        help="torch threads per forward thread; 0: each server's own",
    )
    parser.add_argument(
        "--large-rows", type=int, default=65_000, help="rows of the large request; 0: skip"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]

    def log(message: str) -> None:
        print(f"[bench/serving] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = run(args, log)
    publish_summary("serving", report)
    report.setup["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_report(report, table(report), args.json, "embedded broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

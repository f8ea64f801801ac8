"""The windowed aggregation of `mlbus streams` written with quixstreams, as a user who picked
that library instead would write it: bench/streams.py runs this script with the python of
a separate environment (bench/peers/README.md) against its broker and topic, and prints the
rate beside the faust app's. Reads `inference.logged` (the topic given), writes the closed
windows to an output topic; quixstreams keeps the window state in RocksDB with changelog
topics (its defaults).

What it computes per (record key = model) and window, like the engine (streams/windows.py):
count, errors, the latency sketch (the same `streams/sketch.py`, loaded from its file: this
environment does not have mlbus), latency sum and max, predicted classes, per-feature bins
against the training histogram; on close p50/p95/p99, mean, max, error rate and the PSI of
every feature. Windows: 10 s tumbling and 60 s hopping by 10 s, 5 s grace, event time from
the CloudEvent `time`, as the faust app is configured in the benchmark. The engine builds its
hopping view by merging closed tumbling windows; quixstreams' `hopping_window` updates the
six windows a record falls in, which is how its users write a hopping view. Its window state
is stored serialized (JSON), so each update of a window reads and writes the whole aggregate:
the sketch's few hundred buckets included. `--tumbling-only` leaves the hopping view out, to
show quixstreams without that sixfold amplification.

Not done here, where the faust app does more: contract validation of each record (a plain
`json` deserializer), dead-lettering, the anchor and watermark records, alerts, Prometheus.
So the comparison favours quixstreams.

Prints one JSON line: the rate (records processed per second, from the first record processed
to the last), the process's CPU microseconds per record over that span, and what the
windows held.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from quixstreams import Application

SKETCH = Path(__file__).resolve().parents[2] / "streams" / "sketch.py"
EPSILON = 1e-4  # streams/drift.py's floor of a bin's probability


def load_sketch(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("mlbus_sketch", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def psi(expected: list[float], counts: list[int]) -> float | None:
    total = sum(counts)
    if total == 0:
        return None
    out = 0.0
    for e, count in zip(expected, counts, strict=True):
        a = max(count / total, EPSILON)
        e = max(e, EPSILON)
        out += (a - e) * math.log(a / e)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--output", required=True, help="topic of the closed windows")
    parser.add_argument("--group", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--window-ms", type=int, default=10_000)
    parser.add_argument("--hopping-ms", type=int, default=60_000)
    parser.add_argument("--grace-ms", type=int, default=5_000)
    parser.add_argument("--edges", default="[]", help="JSON: the training histogram's edges")
    parser.add_argument("--counts", default="[]", help="JSON: its counts")
    parser.add_argument("--consumer-config", default="{}", help="JSON: librdkafka settings")
    parser.add_argument("--sketch", default=str(SKETCH))
    parser.add_argument(
        "--tumbling-only", action="store_true", help="no hopping view (for comparison)"
    )
    args = parser.parse_args(argv)

    sketch = load_sketch(Path(args.sketch))
    bucket_of, quantiles = sketch.bucket_of, sketch.quantiles
    edges: list[float] = json.loads(args.edges)
    hist: list[int] = json.loads(args.counts)
    expected = [c / sum(hist) for c in hist] if hist else []
    last_bin = len(hist) - 1

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        consumer_extra_config=json.loads(args.consumer_config),
        loglevel="WARNING",
        on_message_processed=lambda topic, partition, offset: processed(),
    )
    marks: dict[str, float] = {}
    seen = 0

    def processed() -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            marks["first"], marks["cpu_first"] = time.perf_counter(), time.process_time()
        if seen == args.events:
            marks["last"], marks["cpu_last"] = time.perf_counter(), time.process_time()
            app.stop()

    def event_time(value: Any, headers: Any, timestamp: int, kind: Any) -> int:
        at = value.get("time") if isinstance(value, dict) else None
        if not at:
            return timestamp
        return round(datetime.fromisoformat(at).timestamp() * 1000)

    source = app.topic(
        args.topic,
        key_deserializer="str",
        value_deserializer="json",
        timestamp_extractor=event_time,
    )
    output = app.topic(args.output, value_serializer="json")

    def initial(data: dict[str, Any]) -> dict[str, Any]:
        agg = {
            "v": data["version"],
            "n": 0,
            "x": 0,
            "z": 0,
            "l": {},
            "ls": 0.0,
            "lm": 0.0,
            "c": {},
            "b": {},
        }
        return add(agg, data)

    def add(agg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        agg["n"] += 1
        if not data.get("ok", True):
            agg["x"] += 1
        latency = data["latency_seconds"]
        index = bucket_of(latency)
        if index is None:
            agg["z"] += 1
        else:
            key = str(index)  # JSON state: string keys
            agg["l"][key] = agg["l"].get(key, 0) + 1
        agg["ls"] += latency
        agg["lm"] = max(agg["lm"], latency)
        classes = agg["c"]
        for p in data.get("predictions") or ():
            label = str(p)
            classes[label] = classes.get(label, 0) + 1
        inputs = data.get("inputs")
        if edges and inputs:
            bins = agg["b"]
            for j, name in enumerate(data.get("feature_names") or ()):
                counts = bins.get(name)
                if counts is None:
                    counts = bins[name] = [0] * len(hist)
                for sample in inputs:
                    x = sample[j]
                    if math.isfinite(x):
                        i = bisect.bisect_right(edges, x) - 1
                        counts[0 if i < 0 else (last_bin if i > last_bin else i)] += 1
        return agg

    def close(kind: str) -> Any:
        def metrics(window: dict[str, Any]) -> dict[str, Any]:
            agg = window["value"]
            n = agg["n"]
            lat = {int(k): v for k, v in agg["l"].items()}
            q = quantiles(lat, agg["z"], (0.5, 0.95, 0.99))
            drift = {name: psi(expected, counts) for name, counts in sorted(agg["b"].items())}
            return {
                "version": agg["v"],
                "window": kind,
                "window_start": window["start"],
                "window_end": window["end"],
                "requests": n,
                "errors": agg["x"],
                "error_rate": agg["x"] / n if n else 0.0,
                "latency_seconds": {
                    "p50": q.get(0.5),
                    "p95": q.get(0.95),
                    "p99": q.get(0.99),
                    "mean": agg["ls"] / n if n else None,
                    "max": agg["lm"],
                },
                "class_distribution": dict(sorted(agg["c"].items())),
                "psi": drift or None,
            }

        return metrics

    windows = {"tumbling": 0, "hopping": 0, "requests": 0, "late": 0}

    def count(kind: str) -> Any:
        def seen_window(value: dict[str, Any]) -> None:
            windows[kind] += 1
            if kind == "tumbling":
                windows["requests"] += value["requests"]

        return seen_window

    def late(*_: Any) -> bool:
        windows["late"] += 1
        return False  # counted, not logged

    # The CloudEvent's payload (its `time` is the record's timestamp, set by event_time).
    sdf = app.dataframe(source).apply(lambda event: event["data"])
    tumbling = (
        sdf.tumbling_window(args.window_ms, grace_ms=args.grace_ms, on_late=late)
        .reduce(reducer=add, initializer=initial)
        .final()
        .apply(close("tumbling"))
        .update(count("tumbling"))
    )
    tumbling.to_topic(output)
    if not args.tumbling_only:
        hopping = (
            sdf.hopping_window(args.hopping_ms, args.window_ms, grace_ms=args.grace_ms)
            .reduce(reducer=add, initializer=initial)
            .final()
            .apply(close("hopping"))
            .update(count("hopping"))
        )
        hopping.to_topic(output)

    app.run()
    if "last" not in marks:
        print(json.dumps({"error": f"stopped after {seen} of {args.events} records"}))
        return 1
    rate = (args.events - 1) / (marks["last"] - marks["first"])
    cpu = (marks["cpu_last"] - marks["cpu_first"]) / (args.events - 1) * 1e6
    print(json.dumps({"rate": rate, "cpu_us": round(cpu, 2), "processed": seen, **windows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

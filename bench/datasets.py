"""Throughput and memory of the dataset manager against plain pyarrow, in one run.

    .venv/bin/python bench/datasets.py [--mb N] [--repeat R] [--json] [--profile] [--no-profile]

A table of about --mb MB (in-memory Arrow bytes, MB = 10^6 bytes; default 500) is generated
with numpy from a fixed seed (generation is not timed): 10 float64 columns (some rounded to
cents, one with 1 % nulls), 10 float32 columns, 4 int64 columns (counts, amounts, ids), two
low-cardinality string columns (30 countries with a skewed distribution, 4 device kinds) and
an int64 0/1 label, about 176 bytes a row. Everything lives in one temp dir (the raw Parquet
file, a `file://` ObjectStore, the embedded broker's data dir), deleted at the end; the
embedded Tansu broker is started with record=False and stopped at the end.

Measured, each figure best of --repeat runs (default 3), the runs interleaved (raw write,
register, raw read, mlbus read, then again) so that this shared VM's drift hits both sides
alike; reads are short and the noisiest (their wall time depends on getting both cores at
once, which varies by 2x here from run to run at a steady CPU time), so each round reads
--read-repeat (default 3) times each. The median CPU seconds of each phase, a steadier
figure than the wall clock on this VM, is printed below the table. Every rate is MB/s of
the table's in-memory Arrow bytes (`table.nbytes`), so read and write figures compare
directly:

1. raw write      `pq.write_table(table, local path, row_group_size=ROW_GROUP_ROWS,
                  **WRITER_OPTIONS)`: mlbus's own writer settings (datasets/writer.py) and row
                  groups, pyarrow's native file sink, in the same temp dir; no hash, no stats.
2. mlbus register `DatasetRegistry.register(from_table(table), name=...)` onto the file://
                  store: the log scan for known versions, re-cutting into canonical row groups,
                  statistics, the streaming sha256, the staged write and commit, and the
                  `dataset.created` publish (a fresh dataset name per run, so every run really
                  creates and announces a version). Its parts (log scan / write_canonical /
                  publish) are timed too and printed below the table.
3. raw read       `pq.ParquetFile(raw file, pre_buffer=False).iter_batches(batch_size=B,
                  use_threads=True)` (pyarrow's options for local files as mlbus uses them)
                  with B = the DatasetReader default (65,536), every batch consumed.
4. cold read      `DatasetReader(store, uri, content_hash)` over the registered version on a
                  store without a verification cache (MLBUS_VERIFY=full, and what any first
                  read does): all batches iterated, every byte hashed (the background thread
                  re-reads the file while pyarrow decodes; the figure ends when the iterator
                  is exhausted, i.e. after the hash check).
5. warm read      the same on a store with the verification cache (the default), after one
                  untimed priming read of the version (its file's timestamps settled first):
                  the reader stats the file, finds its unchanged identity in the cache, and
                  hashes nothing; each timed read is checked to have been verified by the
                  cache.

Both read phases read files that were just written, after an (untimed) `os.sync()` so
that the kernel's writeback does not compete for the two cores: they come from the page
cache, so the read figures measure decoding (and hashing), not the disk. Which of the two
reads goes first alternates from round to round. The benchmark process is not pinned:
pyarrow's decoder and the hash thread may use both cores, as they would in a service; the
broker is idle during every timed phase except register's publish. Each run also notes the
hypervisor's steal time (/proc/stat) as a hint of how noisy the VM was.

Peak memory of registering, measured in two child processes (fresh interpreters running this
file with --memory-child), each registering the whole table once:
  * "in-memory table": the child generates the same table (same seed), then registers it via
    `from_table`: the table is resident before and after, so the increase is what
    registering itself needs (re-cut copies, statistics, writer buffers, the sink);
  * "Parquet file": the child registers the raw Parquet file through
    `datasets.sources.open_source` (the path `mlbus datasets register x.parquet` takes), so
    the table is never resident and the source's reading is included.
Each child first registers a 1,000-row slice as a warm-up (imports, librdkafka, pydantic),
collects garbage, then measures around the one `register` call:
  * RSS: resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), notes
    VmRSS, and after the call takes VmHWM - that VmRSS. This counts every allocation of the
    process (Arrow buffers, numpy arrays, Python bytes, librdkafka, allocator slack).
  * Arrow pool: `pa.default_memory_pool().max_memory()` after the call minus
    `bytes_allocated()` before it. max_memory() is the pool's peak since the process
    started; in a fresh process whose warm-up peak stays below the registration's, that is
    the registration's peak increase (flagged as an upper bound "<=" if the pool never
    went above its earlier peak). It counts Arrow-allocated bytes only: not numpy arrays
    (the statistics' samples), nor Python bytes objects (what pyarrow reads through a
    Python file object, as open_source does).
Both are set against the largest record batch the writer handles: the biggest batch
`canonical_batches` cuts from this table (ROW_GROUP_ROWS rows of this schema,
`RecordBatch.nbytes`). Target: < 1.5x that batch, for each of the four figures.

Peak memory targets are on the Arrow pool figures (what pyarrow allocates: batches, decoded
row groups, the writer's buffers); RSS is printed beside them for information only.

Targets: register >= 70 % of raw write throughput; warm read >= 95 % of raw read throughput
(the cold read has no target: it is bound by the CPU time of decoding plus hashing).
When register or read misses its target (or with --profile), the path that missed is taken
apart (register: on a slice of --profile-mb MB, default 100): each step timed alone, best of
2, plus a cProfile of one register; cProfile inflates Python-level calls, read it for where,
not how fast. --mb 30 makes a quick check (about 20 s); the default run takes about 100 s,
about 140 s when a path is taken apart.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import mlbus.datasets.registry as registry_module
from bench.common import Figure, Figures, publish_summary, render_table
from mlbus.broker import EmbeddedBroker
from mlbus.datasets.registry import DatasetRegistry, object_key
from mlbus.datasets.sources import READ_BATCH_ROWS, from_table, open_source
from mlbus.datasets.stats import StatsBuilder
from mlbus.datasets.writer import ROW_GROUP_ROWS, WRITER_OPTIONS, HashingSink, canonical_batches
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader, sha256_of
from mlbus.verified import SETTLE_SECONDS, VerifiedObjects

REGISTER_TARGET_RATIO = 0.70
READ_TARGET_RATIO = 0.95  # the warm (cached verification) read
MEMORY_TARGET_RATIO = 1.5
READ_BATCH = 65_536  # DatasetReader's default batch_size
SEED = 20240611
MB = 1_000_000

now = time.perf_counter


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- the data ------------------------------------------------------------------------------

COUNTRIES = [f"{a}{b}" for a in "ABCDEFGHIJ" for b in "XYZ"]  # 30 codes
DEVICES = ["mobile", "desktop", "tablet", "tv"]
ROW_BYTES = 176.4  # estimate used to size the table; the real nbytes are reported


def make_table(mb: float, seed: int = SEED) -> pa.Table:
    """A realistic tabular training set of about `mb` MB of Arrow memory."""
    rng = np.random.default_rng(seed)
    n = max(1000, int(mb * MB / ROW_BYTES))
    columns: dict[str, pa.Array] = {}
    for i in range(10):  # float64: amounts rounded to cents, measurements, one with nulls
        x = rng.normal(10.0 * i, 1.0 + i, n)
        if i % 3 == 0:
            x = np.round(np.abs(x) * 10, 2)
        mask = rng.random(n) < 0.01 if i == 4 else None
        columns[f"x{i:02d}"] = pa.array(x, mask=mask)
    for i in range(10):  # float32 sensor-like features
        columns[f"s{i:02d}"] = pa.array(rng.standard_normal(n, dtype=np.float32) * (i + 1))
    columns["n_orders"] = pa.array(rng.poisson(3, n).astype(np.int64))
    columns["n_visits"] = pa.array(rng.poisson(40, n).astype(np.int64))
    columns["amount_cents"] = pa.array(rng.integers(0, 1_000_000, n))
    columns["user_id"] = pa.array(rng.integers(0, 5_000_000, n))
    weights = 1.0 / np.arange(1, len(COUNTRIES) + 1)  # skewed, like real country columns
    country = rng.choice(len(COUNTRIES), n, p=weights / weights.sum()).astype(np.int32)
    columns["country"] = pa.DictionaryArray.from_arrays(
        pa.array(country), pa.array(COUNTRIES)
    ).dictionary_decode()
    device = rng.choice(len(DEVICES), n, p=[0.55, 0.3, 0.1, 0.05]).astype(np.int32)
    columns["device"] = pa.DictionaryArray.from_arrays(
        pa.array(device), pa.array(DEVICES)
    ).dictionary_decode()
    columns["label"] = pa.array((rng.random(n) < 0.2).astype(np.int64))
    return pa.table(columns)


def largest_writer_batch(table: pa.Table) -> int:
    """nbytes of the biggest batch write_canonical hands to the Parquet writer."""
    source = from_table(table)
    return max(b.nbytes for b in canonical_batches(source.batches, ROW_GROUP_ROWS))


# -- results -------------------------------------------------------------------------------


@dataclass
class Report(Figures):
    setup: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    top = max(runs, key=lambda r: r["rate"])
    cpu = sorted(r["cpu"] * r["seconds"] for r in runs)
    return top | {"runs": [round(r["rate"], 1) for r in runs], "cpu_seconds": cpu[len(cpu) // 2]}


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM, all CPUs (the 8th field of /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(fn: Callable[[], Any], nbytes: int) -> dict[str, Any]:
    gc.collect()
    s0, c0, t0 = steal_seconds(), cpu_seconds(), now()
    out = fn()
    t1, c1, s1 = now(), cpu_seconds(), steal_seconds()
    return {
        "rate": nbytes / MB / (t1 - t0),
        "seconds": t1 - t0,
        "cpu": (c1 - c0) / (t1 - t0),
        "steal": (s1 - s0) / (t1 - t0) / (os.cpu_count() or 1),
        "out": out,
    }


# -- the four phases -----------------------------------------------------------------------


def raw_write(table: pa.Table, path: Path) -> dict[str, Any]:
    r = timed(
        lambda: pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **WRITER_OPTIONS),
        table.nbytes,
    )
    r["file_bytes"] = path.stat().st_size
    return r


def raw_read(path: Path, nbytes: int) -> dict[str, Any]:
    def read() -> int:
        rows = 0
        # The options mlbus reads local files with (pre-buffering off), minus verification.
        with pq.ParquetFile(path, pre_buffer=False) as f:
            for batch in f.iter_batches(batch_size=READ_BATCH, use_threads=True):
                rows += batch.num_rows
        return rows

    return timed(read, nbytes)


class TimedRegistry(DatasetRegistry):
    """DatasetRegistry with its log scan and publish timed (behaviour unchanged)."""

    def __init__(self, store: ObjectStore, kafka: KafkaConfig) -> None:
        super().__init__(store, kafka)
        self.parts: dict[str, float] = {}

    def versions(self, name: str | None = None):  # type: ignore[no-untyped-def]
        t0 = now()
        try:
            return super().versions(name)
        finally:
            self.parts["log_scan"] = self.parts.get("log_scan", 0.0) + now() - t0

    def _announce(self, payload):  # type: ignore[no-untyped-def]
        t0 = now()
        try:
            return super()._announce(payload)
        finally:
            self.parts["publish"] = now() - t0


def mlbus_register(registry: TimedRegistry, table: pa.Table, name: str) -> dict[str, Any]:
    registry.parts = {}
    original = registry_module.write_canonical

    def write_canonical(*args: Any, **kwargs: Any) -> Any:  # timing wrapper, same call
        t0 = now()
        try:
            return original(*args, **kwargs)
        finally:
            registry.parts["write_canonical"] = now() - t0

    registry_module.write_canonical = write_canonical
    try:
        r = timed(lambda: registry.register(from_table(table), name=name), table.nbytes)
    finally:
        registry_module.write_canonical = original
    registered = r["out"]
    if not registered.created or registered.num_rows != table.num_rows:
        raise RuntimeError(f"register {name}: {registered}")
    r["parts"] = dict(registry.parts)
    r["file_bytes"] = registered.num_bytes
    return r


def mlbus_read(
    store: ObjectStore, uri: str, content_hash: str, nbytes: int, expect: str = "sha256"
) -> dict[str, Any]:
    def read() -> int:
        rows = 0
        with DatasetReader(store, uri, content_hash) as reader:  # batch_size: its default
            for batch in reader:
                rows += batch.num_rows
        if reader.verified_by != expect:
            raise RuntimeError(f"read verified by {reader.verified_by}, not {expect}")
        return rows

    return timed(read, nbytes)


def settle(path: str) -> None:
    """Wait until a file's timestamps are old enough for the verification cache."""
    st = os.stat(path)
    age = time.time() - max(st.st_mtime, st.st_ctime)
    if age <= SETTLE_SECONDS:
        time.sleep(SETTLE_SECONDS - age + 0.05)


# -- peak memory (child processes) ---------------------------------------------------------


def _status(key: str) -> int:
    """A /proc/self/status figure, in bytes."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"no {key} in /proc/self/status")
    return int(match.group(1)) * 1024


def memory_child(kind: str, arg: str, store_dir: str, bootstrap: str) -> None:
    """Run in a fresh interpreter: register (kind "file": the Parquet file `arg`; kind
    "table": a table of `arg` MB generated here), print peak memory as JSON on stdout."""
    store = ObjectStore(f"file://{store_dir}")
    registry = DatasetRegistry(store, KafkaConfig(bootstrap=bootstrap, embedded=True))
    tag = uuid.uuid4().hex[:8]
    table = make_table(float(arg)) if kind == "table" else None
    # Warm-up: every code path once, on 1,000 rows (imports, librdkafka, pydantic), through
    # the same kind of source. The file's first 1,000 rows are read page by page (buffered),
    # not as a whole row group, so the warm-up leaves the pool's peak well below the
    # registration's and max_memory() measures the registration.
    if table is not None:
        registry.register(from_table(table.slice(0, 1000)), name=f"bench-mem-warmup-{tag}")
    else:
        with pq.ParquetFile(arg, pre_buffer=False, buffer_size=1 << 16) as f:
            first = next(f.iter_batches(batch_size=1000, use_threads=False))
        warm_path = Path(store_dir) / f"warm-{tag}.parquet"
        pq.write_table(pa.Table.from_batches([first]), warm_path)
        del first
        registry.register(open_source(str(warm_path)), name=f"bench-mem-warmup-{tag}")
        warm_path.unlink()
    gc.collect()
    pool = pa.default_memory_pool()
    pool_before, pool_peak_before = pool.bytes_allocated(), pool.max_memory()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = _status("VmRSS")
    source = from_table(table) if table is not None else open_source(arg)
    t0 = now()
    registered = registry.register(source, name=f"bench-mem-{kind}-{tag}")
    seconds = now() - t0
    pool_peak = pool.max_memory()
    out = {
        "kind": kind,
        "seconds": seconds,
        "created": registered.created,
        "num_rows": registered.num_rows,
        "rss_before": rss_before,
        "rss_peak_increase": _status("VmHWM") - rss_before,
        "pool_before": pool_before,
        "pool_peak_before": pool_peak_before,
        "pool_peak_increase": pool_peak - pool_before,
        # The pool's peak is process-wide: if set before registering (table generation),
        # the figure is only an upper bound.
        "pool_bound": pool_peak == pool_peak_before,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no teardown: nothing to clean up in this process, and it is faster


def peak_memory(kind: str, arg: str, store_dir: Path, bootstrap: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", kind, arg, str(store_dir), bootstrap],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- taking a path apart (on a miss, or --profile) -----------------------------------------


def _consume(batches: Iterator[pa.RecordBatch]) -> int:
    return sum(b.num_rows for b in batches)


def explain_register(table: pa.Table, tmp: Path, registry: TimedRegistry, rounds: int) -> list[str]:
    """Each step of the register path alone on the same slice (best of `rounds`,
    interleaved), then a cProfile of one register."""
    nbytes = table.nbytes
    cut = list(canonical_batches(from_table(table).batches, ROW_GROUP_ROWS))
    path = tmp / "explain.parquet"
    fs = registry.store.fs

    def encode(sink_factory: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            sink = sink_factory()
            try:
                with pq.ParquetWriter(sink, table.schema, **WRITER_OPTIONS) as writer:
                    for batch in cut:
                        writer.write_batch(batch, row_group_size=ROW_GROUP_ROWS)
            finally:
                getattr(sink, "target", sink).close()

        return run

    def stats(names: list[str]) -> Callable[[], None]:
        schema = pa.schema([table.schema.field(n) for n in names])
        batches = [b.select(names) for b in cut]

        def run() -> None:
            builder = StatsBuilder(schema)
            for batch in batches:
                builder.add(batch)
            builder.result()

        return run

    def canonical() -> None:
        with fs.open(str(path), "wb") as handle:
            registry_module.write_canonical(table.schema, from_table(table).batches, handle)

    numeric = [
        f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
    ]
    categorical = [f.name for f in table.schema if f.name not in numeric]
    encode(lambda: pa.OSFile(str(path), "wb"))()
    data = path.read_bytes()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("write_canonical, whole (fsspec file, as register)", canonical),
        ("parquet encode -> native file (= raw write)", encode(lambda: pa.OSFile(str(path), "wb"))),
        (
            "parquet encode -> HashingSink(fsspec file), no stats",
            encode(lambda: HashingSink(fs.open(str(path), "wb"))),
        ),
        (
            "re-cut into canonical batches (from_table)",
            lambda: _consume(canonical_batches(from_table(table).batches, ROW_GROUP_ROWS)),
        ),
        ("StatsBuilder, all columns", stats(table.schema.names)),
        (f"  StatsBuilder, the {len(numeric)} numeric columns", stats(numeric)),
        (f"  StatsBuilder, the {len(categorical)} string columns", stats(categorical)),
        (
            f"sha256 of the {len(data) / MB:.0f} MB of Parquet bytes",
            lambda: hashlib.sha256(data).digest(),
        ),
        ("log scan: registry.versions()", registry.versions),
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for label, fn in steps:
            results.setdefault(label, []).append(timed(fn, nbytes))
    data = b""  # release the copy
    path.unlink()

    profiler = cProfile.Profile()
    registry.parts = {}
    name = f"bench-prof-{uuid.uuid4().hex[:8]}"
    profiler.enable()
    t0 = now()
    registry.register(from_table(table), name=name)
    total = now() - t0
    profiler.disable()
    registry.store.delete(object_key(name, registry.versions(name)[-1].data.version))
    lines = [
        f"register path taken apart on a {nbytes / MB:.0f} MB slice ({len(cut)} canonical "
        f"batches), each step alone, best of {rounds} (MB/s of table bytes; seconds; "
        "process CPU seconds, median):"
    ]
    for label, rs in results.items():
        r = max(rs, key=lambda r: r["rate"])
        cpu = sorted(x["cpu"] * x["seconds"] for x in rs)[len(rs) // 2]
        lines.append(
            f"  {label:<54} {r['rate']:8.1f} MB/s  {r['seconds']:6.2f} s  CPU {cpu:5.2f} s"
        )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    lines.append(
        f"cProfile of one register of the slice ({total:.2f} s under the profiler; "
        f"publish {registry.parts.get('publish', 0):.2f} s), by own time:"
    )
    lines.append(_trim_profile(out.getvalue()))
    return lines


def explain_read(
    store: ObjectStore, uri: str, content_hash: str, nbytes: int, repeat: int
) -> list[str]:
    """The read path's parts on the registered version: decode alone, hash alone, both."""
    fs, path = store.resolve(uri)
    file_bytes = os.path.getsize(path)
    steps: dict[str, list[dict[str, Any]]] = {}

    def decode(use_threads: bool, pre_buffer: bool = True) -> Callable[[], int]:
        def run() -> int:
            with pq.ParquetFile(path, pre_buffer=pre_buffer) as f:
                return _consume(f.iter_batches(batch_size=READ_BATCH, use_threads=use_threads))

        return run

    def decode_while_hashing() -> int:
        hasher = threading.Thread(target=sha256_of, args=(fs, path))
        hasher.start()
        rows = decode(True)()
        hasher.join()
        return rows

    runs: list[tuple[str, Callable[[], Any]]] = [
        ("decode (= raw read: threads, pre_buffer=True)", decode(True)),
        ("decode, pre_buffer=False", decode(True, pre_buffer=False)),
        ("decode, use_threads=False", decode(False)),
        (
            f"sha256_of alone ({file_bytes / MB:.0f} MB file, 8 MiB chunks)",
            lambda: sha256_of(fs, path),
        ),
        ("decode + sha256_of in a thread, joined", decode_while_hashing),
        (
            "DatasetReader, verify=True",
            lambda: _consume(iter(DatasetReader(store, uri, content_hash))),
        ),
        (
            "DatasetReader, verify=False",
            lambda: _consume(iter(DatasetReader(store, uri, None, verify=False))),
        ),
    ]
    for _ in range(repeat):
        for label, fn in runs:
            steps.setdefault(label, []).append(timed(fn, nbytes))
    lines = [
        f"read path taken apart on the registered version, best of {repeat} "
        "(MB/s of table bytes; seconds; process CPU, wall-clock share):"
    ]
    for label, rs in steps.items():
        r = max(rs, key=lambda r: r["rate"])
        lines.append(
            f"  {label:<54} {r['rate']:8.1f} MB/s  {r['seconds']:6.2f} s  CPU {r['cpu']:.0%}"
        )
    return lines


def _trim_profile(text: str) -> str:
    keep = []
    started = False
    for line in text.splitlines():
        if line.strip().startswith("ncalls"):
            started = True
        if started and line.strip():
            keep.append(
                "  "
                + line.replace(str(Path(sys.prefix).resolve()), "<venv>").replace(
                    str(Path(__file__).resolve().parent.parent), "."
                )
            )
    return "\n".join(keep)


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Report:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-bench-ds-")))
        log(f"generating a ~{args.mb:g} MB table (seed {SEED}) ...")
        t0 = now()
        table = make_table(args.mb)
        batch_bytes = largest_writer_batch(table)
        nbytes = table.nbytes
        setup: dict[str, Any] = {
            "table_bytes": nbytes,
            "rows": table.num_rows,
            "columns": table.num_columns,
            "types": _type_summary(table.schema),
            "generate_seconds": round(now() - t0, 1),
            "row_group_rows": ROW_GROUP_ROWS,
            "read_batch_rows": READ_BATCH,
            "source_batch_rows": READ_BATCH_ROWS,
            "largest_batch_bytes": batch_bytes,
            "writer_options": {k: v for k, v in WRITER_OPTIONS.items()},
            "cpus": os.cpu_count(),
            "pyarrow": pa.__version__,
            "memory_pool": pa.default_memory_pool().backend_name,
            "python": sys.version.split()[0],
            "repeat": args.repeat,
            "read_repeat": args.read_repeat,
        }
        report = Report(setup)

        log("starting the embedded broker ...")
        broker = stack.enter_context(EmbeddedBroker(tmp / "broker", record=False))
        broker_pid = broker.process.pid if broker.process else None
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        apply_topics(kafka)
        store_dir = tmp / "store"
        store_dir.mkdir()
        store = ObjectStore(f"file://{store_dir}")  # no cache: every read hashes (cold)
        cached = ObjectStore(f"file://{store_dir}")  # the default: verification cached
        cached.verified = VerifiedObjects(tmp / "verified")
        registry = TimedRegistry(store, kafka)
        raw_path = tmp / "raw.parquet"
        setup["bootstrap"] = broker.bootstrap

        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("rw", "reg", "rr", "mr", "mw")}
        last: Any = None
        for i in range(args.repeat):
            log(f"round {i + 1}/{args.repeat}: raw write ...")
            runs["rw"].append(raw_write(table, raw_path))
            log(f"round {i + 1}/{args.repeat}: mlbus register ...")
            r = mlbus_register(registry, table, f"bench-{uuid.uuid4().hex[:8]}")
            runs["reg"].append(r)
            if last is not None:  # keep one registered copy on disk at a time
                store.delete(store.key_of(last.uri))
            last = r.pop("out")
            # Written-back before reading: the kernel's writeback of ~2 files would otherwise
            # run (on these two cores) during the read phases.
            os.sync()
            # The cache trusts a file only once its timestamps have settled; one untimed read
            # then verifies it in full and records it (what the first consumer does).
            settle(store.resolve(last.uri)[1])
            mlbus_read(cached, last.uri, last.content_hash, nbytes, expect="sha256")
            reads = [
                ("rr", lambda: raw_read(raw_path, nbytes)),
                ("mr", lambda v=last: mlbus_read(store, v.uri, v.content_hash, nbytes)),
                (
                    "mw",
                    lambda v=last: mlbus_read(
                        cached, v.uri, v.content_hash, nbytes, expect="cache"
                    ),
                ),
            ]
            log(
                f"round {i + 1}/{args.repeat}: raw read, cold read, warm read "
                f"x {args.read_repeat} ..."
            )
            for j in range(args.read_repeat):  # alternate which goes first
                for key, fn in reads if (i + j) % 2 == 0 else reads[::-1]:
                    runs[key].append(fn())
        for rs in runs.values():
            for r in rs:
                r.pop("out", None)

        raw_hash = "sha256:" + hashlib.sha256(raw_path.read_bytes()).hexdigest()
        setup["file_bytes"] = last.num_bytes
        setup["raw_file_identical"] = raw_hash == last.content_hash

        rw = report.add(Figure("raw_write", "raw pyarrow write_table", **_fig(runs["rw"])))
        reg = report.add(
            Figure(
                "mlbus_register",
                "mlbus DatasetRegistry.register",
                baseline_key=rw.key,
                target=f">= {REGISTER_TARGET_RATIO:.0%}",
                **_fig(runs["reg"]),
            )
        )
        reg.ok = (report.ratio(reg) or 0) >= REGISTER_TARGET_RATIO
        top = reg.detail
        report.add(
            Figure(
                "mlbus_write_canonical",
                "  of which write_canonical alone",
                nbytes / MB / top["parts"]["write_canonical"],
                baseline_key=rw.key,
                unit="MB/s",
                detail={"seconds": top["parts"]["write_canonical"]},
            )
        )
        rr = report.add(Figure("raw_read", "raw pyarrow iter_batches", **_fig(runs["rr"])))
        report.add(
            Figure(
                "mlbus_read",
                "mlbus DatasetReader, cold (full sha256)",
                baseline_key=rr.key,
                **_fig(runs["mr"]),
            )
        )
        mr = report.add(
            Figure(
                "mlbus_read_warm",
                "mlbus DatasetReader, warm (cached verification)",
                baseline_key=rr.key,
                target=f">= {READ_TARGET_RATIO:.0%}",
                **_fig(runs["mw"]),
            )
        )
        mr.ok = (report.ratio(mr) or 0) >= READ_TARGET_RATIO

        batch = report.add(
            Figure(
                "largest_batch",
                f"largest writer batch ({ROW_GROUP_ROWS:,} rows)",
                batch_bytes / MB,
                unit="MB",
            )
        )
        for kind, arg, what in (
            ("table", f"{args.mb:g}", "in-memory table"),
            ("file", str(raw_path), "Parquet file"),
        ):
            log(f"peak memory: registering from a {what} in a child process ...")
            mem = peak_memory(kind, arg, store_dir, broker.bootstrap)
            if not mem["created"] or mem["num_rows"] != table.num_rows:
                raise RuntimeError(f"memory child registered {mem}")
            bound = "<= " if mem["pool_bound"] else ""
            for key, label, value in (
                (
                    f"memory_{kind}_pool",
                    f"register from {what}: Arrow pool peak {bound}+",
                    mem["pool_peak_increase"],
                ),
                (
                    f"memory_{kind}_rss",
                    f"register from {what}: RSS peak +",
                    mem["rss_peak_increase"],
                ),
            ):
                pool = key.endswith("_pool")  # the target's measure; RSS is information
                fig = report.add(
                    Figure(
                        key,
                        label,
                        value / MB,
                        batch.key,
                        f"<= {MEMORY_TARGET_RATIO}x" if pool else "",
                        detail=mem,
                        unit="MB",
                    )
                )
                fig.ok = value <= MEMORY_TARGET_RATIO * batch_bytes if pool else None

        explain: list[str] = []
        if args.profile or (not reg.ok and not args.no_profile):
            log(f"taking the register path apart on a {args.profile_mb:g} MB slice ...")
            rows = min(table.num_rows, int(args.profile_mb * MB / (nbytes / table.num_rows)))
            part = table.slice(0, rows).combine_chunks()
            explain += explain_register(part, tmp, registry, rounds=2)
            del part
        if args.profile or (not mr.ok and not args.no_profile):
            log("taking the read path apart ...")
            explain += explain_read(store, last.uri, last.content_hash, nbytes, repeat=3)
        report.notes = explain
        del table
        gc.collect()
    setup["broker_stopped"] = broker_pid is None or not Path(f"/proc/{broker_pid}").exists()
    setup["temp_removed"] = not tmp.exists()
    return report


def _fig(rs: list[dict[str, Any]]) -> dict[str, Any]:
    top = best(rs)
    return {"value": top["rate"], "detail": top, "unit": "MB/s"}


def _type_summary(schema: pa.Schema) -> str:
    counts: dict[str, int] = {}
    for f in schema:
        counts[str(f.type)] = counts.get(str(f.type), 0) + 1
    return ", ".join(f"{n} {t}" for t, n in counts.items())


# -- output --------------------------------------------------------------------------------


def table_text(report: Report) -> str:
    s = report.setup
    lines = [
        f"table: {s['rows']:,} rows x {s['columns']} columns ({s['types']}), "
        f"{s['table_bytes'] / MB:,.1f} MB in memory, {s['file_bytes'] / MB:,.1f} MB as Parquet "
        f"({s['writer_options']['compression']}, dictionary, row groups of "
        f"{s['row_group_rows']:,} rows)",
        f"pyarrow {s['pyarrow']} ({s['memory_pool']} pool), Python {s['python']}, "
        f"{s['cpus']} CPUs, not pinned; embedded Tansu broker at {s['bootstrap']}; "
        f"throughput = MB/s of in-memory table bytes, best of {s['repeat']} interleaved runs "
        f"(reads: best of {s['repeat'] * s['read_repeat']})",
        "",
    ]
    header = ("name", "value", "baseline", "ratio", "target", "result")
    rows = []
    for f in report.figures.values():
        base = report.baseline(f)
        ratio = report.ratio(f)
        unit = f" {f.unit}"
        rows.append(
            (
                f.label,
                f"{f.value:,.1f}{unit}",
                f"{base:,.1f}{' MB/s' if f.unit == 'MB/s' else ' MB'}" if base else "",
                f"{ratio:.2f}x" if ratio is not None else "",
                f.target,
                "" if f.ok is None else ("PASS" if f.ok else "FAIL"),
            )
        )
    lines += [*render_table(header, rows), ""]
    for key in ("raw_write", "mlbus_register", "raw_read", "mlbus_read", "mlbus_read_warm"):
        f = report.figures[key]
        d = f.detail
        runs = ", ".join(f"{x:,.1f}" for x in d["runs"])
        line = (
            f"{f.label}: runs {runs} MB/s; best {d['seconds']:.2f} s, process CPU "
            f"{d['cpu']:.0%}, steal {d['steal']:.0%}; CPU time (median) {d['cpu_seconds']:.2f} s"
        )
        if "parts" in d:
            p = d["parts"]
            rest = d["seconds"] - sum(p.values())
            line += (
                f" = write_canonical {p.get('write_canonical', 0):.2f} s + log scan "
                f"{p.get('log_scan', 0):.2f} s + publish {p.get('publish', 0):.2f} s + other "
                f"{rest:.2f} s"
            )
        lines.append(line)
    for kind, what in (("table", "the in-memory table"), ("file", "the Parquet file")):
        mem = report.figures[f"memory_{kind}_rss"].detail
        lines.append(
            f"peak memory, child process registering from {what} ({mem['seconds']:.1f} s): "
            f"VmRSS {mem['rss_before'] / MB:.0f} MB before, peak +"
            f"{mem['rss_peak_increase'] / MB:.1f} MB; Arrow pool {mem['pool_before'] / MB:.1f} MB "
            f"before, peak +{mem['pool_peak_increase'] / MB:.1f} MB"
            + (" (an upper bound: the pool peaked before)" if mem["pool_bound"] else "")
        )
    lines.append(
        f"raw file byte-identical to the registered version: "
        f"{'yes' if s['raw_file_identical'] else 'no'}"
    )
    if report.notes:
        lines += ["", *report.notes]
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    figures = {}
    for f in report.figures.values():
        entry: dict[str, Any] = {"label": f.label, "value": round(f.value, 2), "unit": f.unit}
        if f.baseline_key:
            entry |= {"baseline": f.baseline_key, "ratio": round(report.ratio(f) or 0.0, 4)}
        if f.target:
            entry |= {"target": f.target, "pass": f.ok}
        for k in ("seconds", "cpu", "steal", "cpu_seconds", "runs", "parts", "file_bytes"):
            if k in f.detail:
                v = f.detail[k]
                entry[k] = round(v, 4) if isinstance(v, float) else v
        if f.unit == "MB" and f.detail:
            entry["bytes"] = {
                k: v for k, v in f.detail.items() if isinstance(v, int) and not isinstance(v, bool)
            }
        figures[f.key] = entry
    checks = [f.ok for f in report.figures.values() if f.ok is not None]
    return {
        "benchmark": "datasets",
        "setup": report.setup,
        "figures": figures,
        "notes": report.notes,
        "pass": all(checks),
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="table size in MB (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    parser.add_argument(
        "--read-repeat",
        type=int,
        default=3,
        help="read pairs per round (reads are short and noisy: best of repeat x this)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="take register and read apart (done anyway for a path that misses its target)",
    )
    parser.add_argument("--no-profile", action="store_true", help="never take a path apart")
    parser.add_argument(
        "--profile-mb", type=float, default=100, help="slice taken apart (default 100 MB)"
    )
    args = parser.parse_args(argv)
    if args.mb < 1 or args.repeat < 1 or args.read_repeat < 1:
        parser.error("--mb must be >= 1, --repeat and --read-repeat >= 1")

    def log(message: str) -> None:
        print(f"[bench/datasets] {message}", file=sys.stderr, flush=True)

    started = now()
    report = run(args, log)
    publish_summary("datasets", report)
    report.setup["wall_seconds"] = round(now() - started, 1)
    if args.json:
        print(json.dumps(as_json(report)))
    else:
        print(table_text(report))
        state = (
            "embedded broker stopped"
            if report.setup["broker_stopped"]
            else ("EMBEDDED BROKER STILL RUNNING")
        )
        temp = "temp dir removed" if report.setup["temp_removed"] else "TEMP DIR LEFT BEHIND"
        print(f"total wall time {report.setup['wall_seconds']} s; {state}; {temp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

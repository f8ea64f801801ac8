"""Helpers for tests on object storage and datasets: stores on the local folder and on the
moto S3 server, what a store holds (final objects and staging leftovers), generated tables
and files, and the peak memory of a command run as its own process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mlbus.storage import STAGING, ObjectStore

REPO = Path(__file__).resolve().parents[2]


# -- stores ---------------------------------------------------------------------------------


def s3_options(s3: dict[str, str], **more: Any) -> dict[str, Any]:
    """s3fs options for the moto server of the `s3` fixture (its endpoint goes separately)."""
    return {
        "key": s3["key"],
        "secret": s3["secret"],
        "client_kwargs": {"region_name": s3["region"]},
        **more,
    }


def s3_bucket(s3: dict[str, str]) -> str:
    """A new, empty bucket on the moto server (in a region moto accepts from s3fs)."""
    import s3fs

    name = f"mlbus-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(
        key=s3["key"],
        secret=s3["secret"],
        client_kwargs={"endpoint_url": s3["endpoint_url"], "region_name": s3["region"]},
    )
    fs.mkdir(name, region_name=s3["region"])
    return name


def s3_store(s3: dict[str, str], prefix: str = "objects") -> ObjectStore:
    return ObjectStore(
        f"s3://{s3_bucket(s3)}/{prefix}",
        s3_endpoint_url=s3["endpoint_url"],
        storage_options=s3_options(s3),
    )


def local_store(folder: Path) -> ObjectStore:
    folder.mkdir(parents=True, exist_ok=True)
    return ObjectStore(folder.as_uri())


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh store of `kind` ("file" or "s3") for one test."""
    if kind == "file":
        return local_store(tmp_path / "store")
    return s3_store(request.getfixturevalue("s3"))


#: Parametrize a store fixture with these: the S3 one touches a real part (moto).
STORE_KINDS = ["file", pytest.param("s3", marks=pytest.mark.integration)]


def staging_leftovers(store: ObjectStore) -> list[str]:
    """Whatever is left in the store's staging area (a failed write must leave nothing)."""
    store.fs.invalidate_cache()
    try:
        return sorted(store.fs.find(f"{store.root}/{STAGING}"))
    except FileNotFoundError:
        return []


def everything(store: ObjectStore) -> list[str]:
    """Every key in the store, staging area included, read afresh (no listing cache)."""
    store.fs.invalidate_cache()
    try:
        found = store.fs.find(store.root)
    except FileNotFoundError:
        return []
    return sorted(p[len(store.root) + 1 :] for p in found)


def sha256_hex(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- data -----------------------------------------------------------------------------------


BLOB_BYTES = 96
BLOB_SCHEMA = pa.schema([("blob", pa.binary(BLOB_BYTES)), ("x", pa.float64())])


def blob_table(rows: int, seed: int = 0) -> pa.Table:
    """~100 incompressible bytes a row that are cheap to write and to summarize (a
    fixed-size binary column has no statistics beyond nulls), and one numeric column."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, rows * BLOB_BYTES, dtype=np.uint8).tobytes()
    blob = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(BLOB_BYTES), rows, [None, pa.py_buffer(raw)]
    )
    return pa.table({"blob": blob, "x": rng.random(rows)}, schema=BLOB_SCHEMA)


def write_parquet_file(
    path: Path, rows: int, *, row_group: int = 65_536, chunk: int = 250_000
) -> Path:
    """A large Parquet file (blob_table rows, uncompressed), written chunk by chunk."""
    with pq.ParquetWriter(path, BLOB_SCHEMA, compression="none") as writer:
        for start in range(0, rows, chunk):
            writer.write_table(blob_table(min(chunk, rows - start), seed=start), row_group)
    return path


def write_csv_file(path: Path, rows: int, *, chunk: int = 300_000) -> Path:
    """A large CSV file (~110 bytes a row): a text column of a few long values and a number,
    so that reading the text dominates, not writing Parquet or computing statistics."""
    words = np.array([f"{chr(97 + i)}-" + "category" * 12 for i in range(16)])
    with pcsv.CSVWriter(path, pa.schema([("kind", pa.string()), ("x", pa.float64())])) as writer:
        for start in range(0, rows, chunk):
            rng = np.random.default_rng(start)
            n = min(chunk, rows - start)
            writer.write_table(
                pa.table({"kind": words[rng.integers(0, 16, n)], "x": rng.random(n)})
            )
    return path


# -- memory ---------------------------------------------------------------------------------


# A launcher between the test process and the measured one: a child's peak RSS counts the
# pages it shared with its parent when it was forked, so a child of the (large) pytest process
# would report at least pytest's size. Forked from this small launcher it reports its own.
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
process.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss * 1024))
sys.exit(process.returncode if process.returncode >= 0 else 128 - process.returncode)
"""


def run_measured(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run a command as its own process (in `env`, the whole environment; default: this
    one); return its peak resident memory in bytes (the kernel's ru_maxrss of exactly that
    process, from `wait4`) and its stdout. Fails the test if it exits non-zero or runs longer
    than `timeout`."""
    full_env = dict(os.environ if env is None else env)  # `env` is the whole environment
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "maxrss"
        process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(report), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            start_new_session=True,  # its own process group: a timeout kills both processes
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{' '.join(argv)} did not finish within {timeout:.0f}s")
        assert process.returncode == 0, (
            f"{' '.join(argv)} exited {process.returncode}\n"
            f"stdout: {stdout[-2000:]}\nstderr: {stderr[-3000:]}"
        )
        return int(report.read_text()), stdout


PYTHON = sys.executable

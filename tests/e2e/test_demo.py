"""End to end: the flow of `make demo` (smaller pipeline) on the embedded broker, with the
object store on a real S3 API (moto) and the metadata store on PostgreSQL — every service
as its own process under `mlbus up`, nothing left running afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import s3fs

HERE = Path(__file__).resolve().parent


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_the_demo_flow_runs_on_s3_and_postgres_and_stops_everything(tmp_path, s3, postgres_url):
    bucket = f"mlbus-e2e-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(
        key=s3["key"],
        secret=s3["secret"],
        client_kwargs={"endpoint_url": s3["endpoint_url"], "region_name": s3["region"]},
    )
    fs.mkdir(bucket, region_name=s3["region"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")} | {
        "MLBUS_DATA_DIR": str(tmp_path / "data"),
        "MLBUS_OBJECT_STORE_URL": f"s3://{bucket}/mlbus",
        "MLBUS_S3_ENDPOINT_URL": s3["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3["key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret"],
        "AWS_DEFAULT_REGION": s3["region"],
        "MLBUS_METADATA_URL": postgres_url,
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mlbus", "demo", "--pipeline", str(HERE / "quick.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    log = tmp_path / "data" / "demo" / "up.log"
    assert result.returncode == 0, f"{out}\n{result.stderr}\n{log.read_text()[-4000:]}"
    assert "demo passed" in out
    for step in (
        "training.completed",
        "model.promoted",
        "deployment.updated",
        "POST /v2/models/digits/infer",
        "inference.results",
        "requests, 0 errors",
        "the digits plus shifted copies",
        "the server now answers with version",
        "audit trail of digits@",
    ):
        assert step in out, f"missing {step!r} in\n{out}"
    # Both promotions happened and the second is what serves.
    promoted = re.findall(r"model\.promoted digits@(\S+):", out)
    assert len(set(promoted)) == 2, out
    serving = re.search(r"the server now answers with version (\S+):", out)
    assert serving and serving.group(1) == promoted[-1]
    assert re.search(r"\d+ events \(\d+ verified\)", out), out  # the audit found nothing amiss
    # Restarted on the same data dir: the journal restored the log, the same champion is
    # served and its lineage (run, datasets, decisions) is what it was.
    restart = out[out.index("restart the platform on the same data dir") :]
    assert re.search(r"journal: restored [\d,]+ records of \d+ topics", restart), restart
    again = re.search(r"the server answers with version (\S+) again", restart)
    assert again and again.group(1) == promoted[-1], restart
    assert "the same lineage: run " in restart, restart
    assert "demo failed" not in out
    # The artifacts and the archive are on S3; the graph file in the data dir.
    assert fs.glob(f"{bucket}/mlbus/models/digits/*/model.safetensors")
    assert fs.glob(f"{bucket}/mlbus/archive/model.promoted/*/*.parquet")  # flushed at the stop
    assert (tmp_path / "data" / "demo" / "lineage-digits.svg").read_text().startswith("<svg")
    # Nothing the demo started is still running.
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) >= 18, out  # the broker and the eight services, twice
    assert [p for p in pids if not _gone(p)] == []

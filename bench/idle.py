"""What a quiet platform costs: resident memory and CPU of every process of `mlbus up`
(the embedded broker and each service, with any children) while nothing happens, and
optionally under a burst of the demo's inference traffic.

    .venv/bin/python bench/idle.py [--settle 15] [--seconds 30] [--load] [--json]

Starts `mlbus up` (every service, embedded broker) on a temp data dir with free ports,
waits until every service is ready, lets it settle, then samples each process tree
through /proc: RSS at the end of the window and CPU time spent during it (utime + stime
delta over wall time, as a percentage of one core). Everything started is stopped at the
end, also on error.

Target (idle): under 1 GB resident in total and under 5% of one core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import render_table  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RSS_TARGET_MB = 1024
CPU_TARGET = 5.0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _sample(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of `pid` and its descendants; of the supervisor alone when
    `pid` is negative (its children are measured one by one)."""
    cpu, rss = 0.0, 0
    for p in [-pid] if pid < 0 else _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{p}/statm").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        cpu += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        rss += int(statm[1]) * PAGE
    return cpu, rss


#: Shared libraries that show a heavy module was imported (mapped in /proc/<pid>/maps).
HEAVY = {"torch": "libtorch", "pyarrow": "libarrow", "pandas": "pandas/_libs", "sklearn": "sklearn"}


def heavy(pid: int) -> str:
    """The heavy modules the process tree of `pid` has loaded."""
    found = set()
    for p in [-pid] if pid < 0 else _tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            maps = Path(f"/proc/{p}/maps").read_text()
            found |= {name for name, marker in HEAVY.items() if marker in maps}
    return ", ".join(sorted(found))


def measure(procs: dict[str, int], seconds: float) -> list[tuple[str, float, float]]:
    """(name, RSS MB, CPU % of one core) per process tree over `seconds`."""
    start = {name: _sample(pid) for name, pid in procs.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    rows = []
    for name, pid in procs.items():
        cpu, rss = _sample(pid)
        rows.append((name, rss / 2**20, 100 * (cpu - start[name][0]) / wall))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(up: subprocess.Popen[bytes], root: Path, log: Path) -> dict[str, int]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise SystemExit(f"`mlbus up` exited with code {up.returncode}; see {log}")
        try:
            status = json.loads((root / "services.json").read_text())
            broker = json.loads((root / "broker.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            status = None
        if status and all(s["state"] == "ready" for s in status["services"]):
            return {"mlbus up": -int(status["pid"]), "broker": int(broker["pid"])} | {
                s["service"]: int(s["pid"]) for s in status["services"]
            }
        time.sleep(0.5)
    raise SystemExit(f"services not ready within 240s; see {log}")


def report(
    title: str, rows: list[tuple[str, float, float]], seconds: float, loaded: dict[str, str]
) -> list[str]:
    total_rss = sum(r[1] for r in rows)
    total_cpu = sum(r[2] for r in rows)
    lines = [f"{title} ({seconds:.0f} s window)", ""]
    lines += render_table(
        ["process", "RSS MB", "CPU % of a core", "heavy modules loaded"],
        [[n, f"{rss:,.0f}", f"{cpu:.1f}", loaded.get(n, "")] for n, rss, cpu in rows]
        + [["total", f"{total_rss:,.0f}", f"{total_cpu:.1f}", ""]],
        right=frozenset({1, 2}),
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--only", help="`mlbus up --only`: the services to run (default all)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MLBUS_X=V",
        help="a setting for `mlbus up` (the caller's own MLBUS_ variables are not passed on)",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mlbus-idle-"))
    ports = {"serve": _free_port(), "api": _free_port(), "metrics": _free_port()}
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")}
        | {
            "MLBUS_DATA_DIR": str(root),
            "MLBUS_SERVING__PORT": str(ports["serve"]),
            "MLBUS_API__PORT": str(ports["api"]),
            "MLBUS_STREAMS__METRICS_PORT": str(ports["metrics"]),
            "PYTHONPATH": str(ROOT),
        }
        | dict(item.split("=", 1) for item in args.set)
    )
    log = root / "up.log"
    with log.open("wb") as sink:
        up = subprocess.Popen(
            [sys.executable, "-m", "mlbus", "up", *(["--only", args.only] if args.only else [])],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    code = 1
    try:
        procs = _wait_ready(up, root, log)
        time.sleep(args.settle)
        rows = measure(procs, args.seconds)
        loaded = {name: heavy(pid) for name, pid in procs.items()}
        total_rss = sum(r[1] for r in rows)
        total_cpu = sum(r[2] for r in rows)
        ok = total_rss < RSS_TARGET_MB and total_cpu < CPU_TARGET
        if args.json:
            print(
                json.dumps(
                    {
                        "processes": {
                            n: {"rss_mb": m, "cpu_pct": c, "heavy": loaded[n]} for n, m, c in rows
                        },
                        "total_rss_mb": total_rss,
                        "total_cpu_pct": total_cpu,
                        "ok": ok,
                    }
                )
            )
        else:
            print("\n".join(report("mlbus up, idle", rows, args.seconds, loaded)))
            print("load average over 1/5/15 min: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
            print(
                f"\ntarget: < {RSS_TARGET_MB} MB and < {CPU_TARGET:.0f}% of a core: "
                + ("met" if ok else "NOT met")
            )
        code = 0 if ok else 1
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Every benchmark in one run, then one table of their figures and ratios (the README's
performance table is this output).

    .venv/bin/python bench/run_all.py            full sizes (about 30-40 minutes on 2 cores)
    .venv/bin/python bench/run_all.py --quick    reduced sizes, to check they all work

Each benchmark runs in its own process, one after the other (never two at once: they would
measure each other), measuring its baseline and mlbus in the same run; their own reports go
to bench/results/<name>.txt, and their figures to the combined table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SUMMARY_ENV, render_table

HERE = Path(__file__).resolve().parent
#: name → (full-size arguments, quick arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "bus": ([], ["--events", "20000", "--repeat", "2"]),
    "datasets": ([], ["--mb", "50", "--repeat", "1"]),
    "trainer": ([], ["--rows", "50000"]),
    "lineage": ([], ["--events", "50000", "--queries", "300"]),
    "archive": ([], ["--events", "50000"]),
    "workflow": ([], ["--completions", "100"]),
    "serving": ([], ["--seconds", "2", "--promotions", "5"]),
    "streams": ([], ["--events", "20000"]),
}


def _format(value: float, unit: str) -> str:
    if unit in ("ms", "s"):
        return f"{value:,.1f} {unit}"
    if unit in ("x", "ratio"):
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmarks")
    args = parser.parse_args(argv)
    names = [n for n in BENCHMARKS if not args.only or n in args.only.split(",")]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    summary = Path(tempfile.mkstemp(prefix="mlbus-bench-", suffix=".jsonl")[1])
    failed = []
    started = time.monotonic()
    try:
        for name in names:
            full, quick = BENCHMARKS[name]
            command = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)]
            print(f"[run_all] {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            t = time.monotonic()
            with (results / f"{name}.txt").open("w") as out:
                code = subprocess.call(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=os.environ | {SUMMARY_ENV: str(summary)},
                )
            print(
                f"[run_all] {name}: exit {code} in {time.monotonic() - t:.0f}s "
                f"(report: bench/results/{name}.txt)",
                file=sys.stderr,
                flush=True,
            )
            if code != 0:
                failed.append(name)
        entries = [json.loads(line) for line in summary.read_text().splitlines() if line]
    finally:
        summary.unlink(missing_ok=True)
    rows = []
    for e in entries:
        ratio = f"{e['ratio']:.2f}x" if e.get("ratio") is not None else ""
        verdict = {True: "pass", False: "MISS", None: ""}[e.get("ok")]
        target = f"{e['target']} {verdict}".strip() if e.get("target") else verdict
        rows.append(
            [
                e["benchmark"],
                e["label"],
                _format(e["value"], e["unit"]),
                ratio,
                e.get("baseline", ""),
                target,
            ]
        )
    header = ["benchmark", "figure", "value", "ratio", "vs baseline", "target"]
    print("\n".join(render_table(header, rows, right=frozenset({2, 3}))))
    print(
        f"\n{len(names)} benchmarks in {time.monotonic() - started:.0f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

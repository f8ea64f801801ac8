"""Before/after: every benchmark run from two checkouts in one run, alternating, and each
figure of this tree compared with the same figure of the other.

    .venv/bin/python bench/compare.py --base ../mlbus-before           full sizes
    .venv/bin/python bench/compare.py --base ../mlbus-before --quick   reduced sizes

`--base` is another checkout of mlbus (e.g. `git worktree add ../mlbus-before <commit>`); both
run with this virtual environment. Each benchmark runs base, this tree, base, this tree
(`--rounds`), one at a time, and the best of each side's rounds is compared, so a passing
load on the machine hurts both sides alike. A figure more than `--tolerance` worse is
flagged; which direction is worse follows the unit (events/s: lower; ms, s: higher).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SUMMARY_ENV, render_table
from bench.run_all import BENCHMARKS

HERE = Path(__file__).resolve().parent.parent
LOWER_IS_BETTER = {"ms", "s"}


def run(tree: Path, name: str, args: list[str]) -> dict[str, tuple[float, str]]:
    """The figures of one benchmark run from `tree`: label -> (value, unit)."""
    summary = Path(tempfile.mkstemp(prefix="mlbus-compare-", suffix=".jsonl")[1])
    try:
        env = os.environ | {SUMMARY_ENV: str(summary), "PYTHONPATH": str(tree)}
        command = [sys.executable, str(tree / "bench" / f"{name}.py"), *args]
        code = subprocess.call(
            command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if code != 0:
            print(f"[compare] {name} from {tree}: exit {code}", file=sys.stderr, flush=True)
        entries = [json.loads(line) for line in summary.read_text().splitlines() if line]
    finally:
        summary.unlink(missing_ok=True)
    return {e["label"]: (float(e["value"]), e["unit"]) for e in entries}


def best(a: tuple[float, str] | None, b: tuple[float, str]) -> tuple[float, str]:
    if a is None:
        return b
    lower = b[1] in LOWER_IS_BETTER
    return min(a, b) if lower else max(a, b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="the other checkout")
    parser.add_argument("--quick", action="store_true", help="reduced sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmarks")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    base = args.base.resolve()
    names = [n for n in BENCHMARKS if not args.only or n in args.only.split(",")]
    rows, worse = [], []
    for name in names:
        full, quick = BENCHMARKS[name]
        bench_args = quick if args.quick else full
        sides: dict[str, dict[str, tuple[float, str]]] = {"base": {}, "this": {}}
        for r in range(args.rounds):
            for side, tree in (("base", base), ("this", HERE)):
                print(
                    f"[compare] {name} round {r + 1}/{args.rounds}: {side}",
                    file=sys.stderr,
                    flush=True,
                )
                for label, figure in run(tree, name, bench_args).items():
                    sides[side][label] = best(sides[side].get(label), figure)
        for label, (value, unit) in sides["this"].items():
            if label not in sides["base"]:
                continue
            before = sides["base"][label][0]
            if before == 0:
                continue
            change = value / before - 1
            bad = -change if unit not in LOWER_IS_BETTER else change
            flag = "WORSE" if bad > args.tolerance else ""
            if flag:
                worse.append(f"{name}: {label}")
            rows.append(
                [
                    name,
                    label,
                    f"{before:,.2f} {unit}",
                    f"{value:,.2f} {unit}",
                    f"{change:+.1%}",
                    flag,
                ]
            )
    header = ["benchmark", "figure", "base", "this tree", "change", ""]
    print("\n".join(render_table(header, rows, right=frozenset({2, 3, 4}))))
    print(
        f"\n{len(worse)} figures more than {args.tolerance:.0%} worse"
        + (": " + "; ".join(worse) if worse else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

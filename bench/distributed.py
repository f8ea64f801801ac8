"""Data-parallel speed-up of mlbus's training loop: `fit` (1 process x 1 thread) against
`fit_distributed` (2 processes x 1 thread, gloo), interleaved, in one run.

    .venv/bin/python bench/distributed.py [--family cnn|mlp] [--rows N] [--epochs E]
                                          [--batch B] [--repeat R] [--json]

Both sides run the trainer's own loops (`fit` for a 1-worker run, `fit_distributed` for each
member of a `workers: N` run), the group joined with the trainer's `join_group` on a c10d
store; only the rendezvous over the bus (once per run, not per step) is left out.

The model is compute-bound by default: mlbus's built-in `cnn` family (channels 16) on
synthetic 28x28 grey images (784 pixel columns, 10 classes, numpy with a fixed seed), about
26 k parameters, so a step computes much and all-reduces ~100 kB of gradients. The script
first checks that forward + backward of one global batch takes >= 5 ms of CPU on one thread.
`--family mlp` measures the opposite kind: a 256 -> 1024 -> 1024 -> 10 MLP has 1.3 M
parameters and spends 2 multiply-adds per parameter per row, so its 5 MB gradient
all-reduce over loopback costs as much as half of a member's compute.

Each repeat runs, in this order (so drift of the shared machine's load hits all alike):
  single      `fit`, one process, batch B
  ddp global  `fit_distributed`, two processes, global batch B (B/2 rows per member and
              step): the steps and weights of `single` (strong scaling)
  ddp member  `fit_distributed`, two processes, B rows per member (global batch 2B): the
              usual data-parallel throughput comparison, per-member batch held (weak
              scaling); half the steps per epoch
  2 singles   two `fit` processes side by side with no group between them (batch B each):
              what two processes of this work get from the machine, the ceiling of the
              2-worker runs; a data-parallel run is measured against it too
Every run is in fresh spawned processes (the single one too, so that all pay the same
first-use costs: oneDNN kernels built per shape, memory first touched).
samples/s = epochs x training rows / wall time of the `fit` or `fit_distributed` call (each
includes one validation pass per epoch and the final scoring of every split, which members
share out as the trainer does). A ratio is taken against the same repeat's `single`; the
median and the best over repeats are printed. CPU-seconds per 1000 training rows (every
process of the run together, gloo's threads included) are printed beside: they depend far
less on the machine's load than wall time, and their ratio is the data-parallel overhead.
The all-reduce per step is measured in the `ddp global` group after training: a buffer the
size of the gradients, all-reduced as many times as an epoch has steps. Members run in
spawned processes with torch.set_num_threads(1) and OMP_NUM_THREADS=1; every member must
exit with code 0 (a teardown abort fails the bench). Load averages are printed per repeat.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one intra-op thread per process

import argparse
import json
import multiprocessing
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mlbus.trainer.data import Prepared, prepare
from mlbus.trainer.distributed import fit_distributed, join_group, leave_group
from mlbus.trainer.training import fit

FAMILIES: dict[str, tuple[int, dict[str, Any]]] = {
    # family: (features per row, hyperparameters)
    "cnn": (784, {"lr": 1e-3, "weight_decay": 0.0, "channels": 16, "dropout": 0.0}),
    "mlp": (256, {"lr": 1e-3, "weight_decay": 0.0, "hidden": 1024, "layers": 2, "dropout": 0.0}),
}


def data(family: str, rows: int) -> Prepared:
    features = FAMILIES[family][0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    labels = (x @ rng.normal(size=(features, 10)).astype(np.float32)).argmax(axis=1)
    names = [f"f{i}" for i in range(features)]
    return prepare(x, labels, features=names, label="y", seed=0, validation=0.05, test=0.05)


def params_of(family: str, batch: int) -> dict[str, Any]:
    return FAMILIES[family][1] | {"batch_size": batch}


def step_ms(family: str, batch: int) -> tuple[float, float]:
    """Forward + backward of one batch on one thread, best of 10: wall and CPU ms (CPU time
    hardly depends on how busy the machine is)."""
    from mlbus.families import build

    model = build(family, FAMILIES[family][0], 10, params_of(family, batch))
    x = torch.randn(batch, FAMILIES[family][0])
    y = torch.randint(0, 10, (batch,))
    wall = cpu = float("inf")
    for _ in range(10):
        started, used = time.perf_counter(), time.process_time()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - used)
    return wall * 1000, cpu * 1000


def _thread_ticks() -> dict[str, int]:
    """CPU clock ticks of this process's threads, by thread name."""
    ticks: dict[str, int] = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                head, _, tail = f.read().rpartition(")")
        except FileNotFoundError:
            continue
        name, fields = head.partition("(")[2], tail.split()
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    return ticks


def _timed(train: Callable[[], Any]) -> dict[str, Any]:
    """Wall and process CPU seconds of `train()`, and the share of CPU taken by threads that
    are not the Python thread (gloo's and the store's)."""
    before, cpu, started = _thread_ticks(), time.process_time(), time.perf_counter()
    train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = _thread_ticks()
    main = next(iter(after))  # the process's first task is its main thread
    own = after.get(main, 0) - before.get(main, 0)
    rest = sum(after.values()) - sum(before.values()) - own
    return {"wall": wall, "cpu": cpu, "other_threads_ticks": rest, "all_ticks": rest + own}


def _member(
    rank: int, port: int, family: str, rows: int, epochs: int, batch: int, reduce: bool, out: Any
) -> None:
    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False)
    join_group(store, rank, 2, device="cpu", timeout=300)
    try:
        prepared = data(family, rows)
        params = params_of(family, batch)
        torch.distributed.barrier()
        figures = _timed(
            lambda: fit_distributed(prepared, family, params, max_epochs=epochs, seed=0)
        )
        if reduce:
            from mlbus.families import build

            model = build(family, FAMILIES[family][0], 10, params)
            buffer = torch.zeros(sum(p.numel() for p in model.parameters()))
            steps = -(-len(prepared.x["train"]) // batch)
            torch.distributed.barrier()
            began = time.perf_counter()
            for _ in range(steps):
                torch.distributed.all_reduce(buffer)
            figures["allreduce_ms"] = (time.perf_counter() - began) / steps * 1000
            figures["gradient_bytes"] = buffer.numel() * buffer.element_size()
        out.put((rank, figures))
    finally:
        leave_group()


def _solo(family: str, rows: int, epochs: int, batch: int, out: Any) -> None:
    torch.set_num_threads(1)
    prepared, params = data(family, rows), params_of(family, batch)
    out.put((0, _timed(lambda: fit(prepared, family, params, max_epochs=epochs, seed=0))))


def _single(family: str, rows: int, epochs: int, batch: int) -> dict[str, Any]:
    """`fit` in a fresh process, as each member is: both pay the same first-use costs
    (oneDNN kernels built per shape, memory first touched)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    solo = ctx.Process(target=_solo, args=(family, rows, epochs, batch, out))
    solo.start()
    _, figures = out.get(timeout=3600)
    solo.join(120)
    if solo.exitcode != 0:
        raise SystemExit(f"the single process exited with code {solo.exitcode}")
    return dict(figures)


def _pair(family: str, rows: int, epochs: int, batch: int) -> dict[str, Any]:
    """Two `fit` processes side by side, no group between them: what two processes of this
    work get from the machine (cores that share caches, memory bandwidth and a hypervisor),
    the ceiling of a 2-worker run. Its `rate` is both processes' samples/s together."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    solos = [ctx.Process(target=_solo, args=(family, rows, epochs, batch, out)) for _ in range(2)]
    for solo in solos:
        solo.start()
    results = [out.get(timeout=3600)[1] for _ in solos]
    for solo in solos:
        solo.join(120)
    if any(solo.exitcode != 0 for solo in solos):
        raise SystemExit(f"a single process exited with {[p.exitcode for p in solos]}")
    trained = len(data(family, rows).x["train"]) * epochs
    return {
        "rate": sum(trained / r["wall"] for r in results),
        "cpu": sum(r["cpu"] for r in results) / 2,  # per run of `trained` rows
    }


def _ddp(family: str, rows: int, epochs: int, batch: int, reduce: bool) -> dict[str, Any]:
    """Two members; rank 0's wall time (both start after a barrier and end together), both
    members' CPU."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    members = [
        ctx.Process(target=_member, args=(r, port, family, rows, epochs, batch, reduce, out))
        for r in range(2)
    ]
    for m in members:
        m.start()
    results = dict(out.get(timeout=3600) for _ in members)
    for m in members:
        m.join(120)
    codes = [m.exitcode for m in members]
    if codes != [0, 0]:
        raise SystemExit(f"member exit codes {codes}: a member did not end cleanly")
    merged = dict(results[0])
    merged["wall"] = max(r["wall"] for r in results.values())
    merged["cpu"] = sum(r["cpu"] for r in results.values())
    merged["other_threads_ticks"] = sum(r["other_threads_ticks"] for r in results.values())
    merged["all_ticks"] = sum(r["all_ticks"] for r in results.values())
    return merged


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(family: str, rows: int, epochs: int, batch: int, repeat: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    prepared = data(family, rows)
    trained = len(prepared.x["train"]) * epochs
    per_step, per_step_cpu = step_ms(family, batch)
    rounds: list[dict[str, Any]] = []
    for _ in range(repeat):
        load = _load()
        single = _single(family, rows, epochs, batch)
        same_global = _ddp(family, rows, epochs, batch, reduce=True)
        per_member = _ddp(family, rows, epochs, 2 * batch, reduce=False)
        pair = _pair(family, rows, epochs, batch)
        rounds.append(
            {
                "pair": pair,
                "ratio_pair": pair["rate"] * single["wall"] / trained,
                "load_before": load,
                "load_after": _load(),
                "single": single,
                "ddp_global": same_global,
                "ddp_member": per_member,
                "ratio_global": single["wall"] / same_global["wall"],
                "ratio_member": single["wall"] / per_member["wall"],
            }
        )
    best = min(rounds, key=lambda r: r["single"]["wall"])

    def cpu_per_1000(kind: str) -> float:
        return statistics.median(r[kind]["cpu"] for r in rounds) / trained * 1000

    return {
        "family": family,
        "rows_trained_per_epoch": len(prepared.x["train"]),
        "epochs": epochs,
        "batch": batch,
        "repeat": repeat,
        "forward_backward_ms_one_thread": per_step,
        "forward_backward_cpu_ms_one_thread": per_step_cpu,
        "single_samples_per_s": trained / best["single"]["wall"],
        "ddp_global_samples_per_s": trained / min(r["ddp_global"]["wall"] for r in rounds),
        "ddp_member_samples_per_s": trained / min(r["ddp_member"]["wall"] for r in rounds),
        "ratio_global_median": statistics.median(r["ratio_global"] for r in rounds),
        "ratio_global_best": max(r["ratio_global"] for r in rounds),
        "ratio_member_median": statistics.median(r["ratio_member"] for r in rounds),
        "ratio_member_best": max(r["ratio_member"] for r in rounds),
        "ratio_pair_median": statistics.median(r["ratio_pair"] for r in rounds),
        "cpu_s_per_1000_rows": {
            k: cpu_per_1000(k) for k in ("single", "ddp_global", "ddp_member", "pair")
        },
        "gloo_threads_cpu_share": sum(r["ddp_global"]["other_threads_ticks"] for r in rounds)
        / max(sum(r["ddp_global"]["all_ticks"] for r in rounds), 1),
        "allreduce_ms_per_step": statistics.median(r["ddp_global"]["allreduce_ms"] for r in rounds),
        "gradient_bytes": rounds[0]["ddp_global"]["gradient_bytes"],
        "steps_per_epoch": -(-len(prepared.x["train"]) // batch),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cnn")
    parser.add_argument("--rows", type=int, default=8_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    f = run(args.family, args.rows, args.epochs, args.batch, args.repeat)
    if args.json:
        print(json.dumps(f))
        return
    ms, cpu_ms, b = (
        f["forward_backward_ms_one_thread"],
        f["forward_backward_cpu_ms_one_thread"],
        f["batch"],
    )
    print(
        f"{f['family']}: {f['rows_trained_per_epoch']} training rows x {f['epochs']} epochs, "
        f"batch {b}, {f['repeat']} interleaved repeats"
    )
    print(
        f"forward+backward of one batch of {b}, 1 thread: {cpu_ms:.1f} ms CPU ({ms:.1f} ms wall)"
        + ("" if cpu_ms >= 5 else "  (< 5 ms: not compute-bound)")
    )
    print(
        "repeat  load before -> after        single   ddp global  ddp member   "
        "2 singles side by side   (samples/s)"
    )
    trained = f["rows_trained_per_epoch"] * f["epochs"]
    for i, r in enumerate(f["rounds"], 1):
        print(
            f"{i:>6}  {r['load_before']:>14} -> {r['load_after']:<14}"
            f"{trained / r['single']['wall']:7.0f} {trained / r['ddp_global']['wall']:10.0f} "
            f"({r['ratio_global']:.2f}x) {trained / r['ddp_member']['wall']:8.0f} "
            f"({r['ratio_member']:.2f}x) {r['pair']['rate']:8.0f} ({r['ratio_pair']:.2f}x)"
        )
    cpu = f["cpu_s_per_1000_rows"]
    print(
        f"2 workers x 1 thread vs 1 x 1, per-member batch {b} held (global {2 * b}):  "
        f"median {f['ratio_member_median']:.2f}x  best {f['ratio_member_best']:.2f}x  "
        "(target >= 1.7)"
    )
    print(
        f"2 workers x 1 thread vs 1 x 1, global batch {b} held ({b // 2} per member):  "
        f"median {f['ratio_global_median']:.2f}x  best {f['ratio_global_best']:.2f}x"
    )
    print(
        f"CPU-seconds per 1000 rows (all processes): single {cpu['single']:.3f}, "
        f"ddp global {cpu['ddp_global']:.3f} ({cpu['ddp_global'] / cpu['single']:.2f}x), "
        f"ddp member {cpu['ddp_member']:.3f} ({cpu['ddp_member'] / cpu['single']:.2f}x), "
        f"2 singles side by side {cpu['pair']:.3f} ({cpu['pair'] / cpu['single']:.2f}x)"
    )
    share = f["ratio_member_median"] / f["ratio_pair_median"]
    print(
        f"the machine's ceiling, 2 singles side by side (no group) vs 1 alone: median "
        f"{f['ratio_pair_median']:.2f}x; ddp member at {share:.0%} of it"
    )
    print(
        f"all-reduce per step: {f['allreduce_ms_per_step']:.2f} ms for "
        f"{f['gradient_bytes'] / 1e3:.0f} kB of gradients ({f['steps_per_epoch']} steps/epoch "
        f"at batch {b}); gloo's and the store's threads: "
        f"{100 * f['gloo_threads_cpu_share']:.1f}% of the members' CPU"
    )


if __name__ == "__main__":
    main()

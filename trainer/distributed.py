"""Data-parallel training of one run on several trainer workers: the loop each member runs
inside a torch.distributed process group (DistributedDataParallel over gloo on the CPU,
nccl on CUDA). Reads and writes no topic; rank 0's callbacks publish (trainer/worker.py)
and the group is formed through the bus (trainer/rendezvous.py, docs/distributed.md).

Same seed and same global batch give the weights a single-process `fit` gives, within
floating-point tolerance: every member draws the same permutation from the run's seed,
takes its strided share of each *global* batch, and scales its summed loss so that the
gradient DDP averages is the mean over the whole global batch (torch's DistributedSampler
shards the epoch, not each batch, so a batch would hold other rows than the single-process
run's). Dropout masks differ (each member draws its own), so runs with dropout are equal
in distribution only.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mlbus.errors import TransientError
from mlbus.runtime import steady_allocations
from mlbus.schemas.training import FamilyOrigin
from mlbus.trainer import rendezvous
from mlbus.trainer.data import Prepared
from mlbus.trainer.training import (
    Checkpoint,
    CheckpointCallback,
    EpochCallback,
    Result,
    _better,
    _snapshot,
    scorer,
    task_parts,
)


class MemberLost(TransientError):
    """A member of the process group went away (killed, cut off) or a collective timed out:
    the run restarts from its last checkpoint with the members that remain."""


#: torch.distributed's default group is one per process (mlbus.trainer.rendezvous holds
#: the lock a run's group is formed under).
GROUP = rendezvous.GROUP


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class GlobalBatches:
    """A distributed sampler by global batch: each epoch one permutation from the run's
    generator (the same on every member), cut into global batches of `batch` rows; member
    `rank` takes rows rank, rank+world, … of each (possibly none of a short last batch)."""

    def __init__(self, rows: int, batch: int, rank: int, world: int) -> None:
        self.rows, self.batch, self.rank, self.world = rows, batch, rank, world

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        """(this member's row indices, the global batch's size) for each batch."""
        order = torch.randperm(self.rows, generator=generator)
        for i in range(0, self.rows, self.batch):
            whole = order[i : i + self.batch]
            yield whole[self.rank :: self.world], len(whole)


class SharedForward(torch.nn.Module):
    """The trained model's forward pass over a whole split, shared out: member `rank` runs
    rows rank, rank + world, … and the outputs are all-gathered back into the split's order,
    so every member scores the same outputs (and agrees on early stopping) for 1/world of
    the work. Modules the optimiser sees are not touched."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int) -> None:
        super().__init__()
        self.model, self.rank, self.world = model, rank, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[self.rank :: self.world]
        # A member with no row of a tiny split still takes part in the gather.
        mine = self.model(rows if len(rows) else x[:1])[: len(rows)]
        per = -(-len(x) // self.world)
        padded = mine.new_zeros((per, *mine.shape[1:]))
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        # parts[r][i] is row i * world + r: interleave, then drop the padding at the end
        return torch.stack(parts, dim=1).reshape(per * self.world, *mine.shape[1:])[: len(x)]


def join_group(store: dist.Store, rank: int, world: int, *, device: str, timeout: float) -> None:
    """Join the process group on `store`; every collective then fails after `timeout`
    seconds instead of waiting forever for a member that is gone."""
    global _quiesce_registered
    if not _quiesce_registered:
        atexit.register(quiesce_gloo)
        _quiesce_registered = True
    dist.init_process_group(
        backend_for(device),
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_quiesce_registered = False


def quiesce_gloo(limit: float = 5.0) -> None:
    """Wait (without the GIL) until gloo's work threads in this process are idle; run at
    interpreter exit.

    A group that DistributedDataParallel wrapped outlives `destroy_process_group` (what DDP
    builds keeps it alive, even once the DDP module and the model are gone), and with it
    gloo's work threads. Such a thread drops its reference
    to a finished collective a moment after the caller's wait returns; when that reference
    is the last one to a tensor Python created, the drop needs the GIL. If the interpreter
    is already finalising, the thread exits inside a C++ destructor and the process aborts
    with "terminate called without an active exception" (exit code -6). A script that
    ends right after training loses that race on a busy machine; waiting here until every
    such thread sleeps, which it does only with no work in hand, closes it."""
    deadline = time.monotonic() + limit
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        states = _thread_states("pt_gloo_runloop")
        if not states:
            return
        quiet = quiet + 1 if all(s in "SD" for s in states) else 0
        time.sleep(0.005)


def _thread_states(name: str) -> list[str]:
    """The scheduler states (R, S, D, …) of this process's threads called `name` (Linux)."""
    states = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                head, _, tail = f.read().rpartition(")")
        except OSError:
            continue
        if head.partition("(")[2] == name:
            states.append(tail.split()[0])
    return states


@steady_allocations()
def fit_distributed(
    data: Prepared,
    family: str,
    params: Mapping[str, Any],
    *,
    max_epochs: int,
    seed: int,
    early_stopping: Any = None,
    on_epoch: EpochCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_checkpoint: CheckpointCallback | None = None,
    resume: Checkpoint | None = None,
    device: str = "cpu",
    loss: str | None = None,
    origin: FamilyOrigin | None = None,
) -> Result:
    """`training.fit` as one member of the current process group. Only rank 0 calls
    `on_checkpoint` and `on_epoch`; every member returns the same model. A lost member
    surfaces as `MemberLost`."""
    try:
        return _fit(
            data,
            family,
            params,
            max_epochs=max_epochs,
            seed=seed,
            early_stopping=early_stopping,
            on_epoch=on_epoch,
            should_stop=should_stop,
            on_checkpoint=on_checkpoint,
            resume=resume,
            device=device,
            loss=loss,
            origin=origin,
        )
    except (RuntimeError, dist.DistBackendError) as e:
        # gloo reports a closed peer or a timed-out collective as a RuntimeError
        raise MemberLost(f"process group lost a member: {e}") from e


def _fit(
    data: Prepared,
    family: str,
    params: Mapping[str, Any],
    *,
    max_epochs: int,
    seed: int,
    early_stopping: Any,
    on_epoch: EpochCallback | None,
    should_stop: Callable[[], bool],
    on_checkpoint: CheckpointCallback | None,
    resume: Checkpoint | None,
    device: str,
    loss: str | None,
    origin: FamilyOrigin | None,
) -> Result:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    regression = data.task == "regression"
    target = torch.device(device)
    model, criterion, _ = task_parts(data, family, params, loss=loss, origin=origin, target=target)
    scores_on = scorer(data, SharedForward(model, rank, world), loss)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"])
    )
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best: float | None = None
    stale, done, finished = 0, 0, False
    if resume is not None:
        model.load_state_dict(resume.model)
        optimiser.load_state_dict(resume.optimiser)
        generator.set_state(resume.generator)
        torch.set_rng_state(resume.rng)
        history, best, stale = list(resume.history), resume.best, resume.stale
        done, finished = resume.epoch, resume.finished
    # DDP broadcasts rank 0's parameters when it wraps the model: members start equal.
    # Gradients as views of DDP's all-reduce buckets: no copy into and out of them per step.
    ddp = DistributedDataParallel(
        model,
        device_ids=[target.index] if target.index else None,
        gradient_as_bucket_view=True,
    )
    x, y = data.x["train"].to(target), data.y["train"].to(target)
    validation = data.x["validation"].to(target), data.y["validation"].to(target)
    batches = GlobalBatches(len(x), int(params["batch_size"]), rank, world)
    rate, stopped = 0.0, False
    for epoch in range(done + 1, max_epochs + 1):
        if finished:
            break
        # Every member must agree to stop, or the others would wait in the next all-reduce.
        stop = torch.tensor([1.0 if should_stop() else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            stopped = True
            break
        ddp.train()
        started = time.perf_counter()
        total = torch.zeros((), device=target)
        for share, size in batches.epoch(generator):
            index = share.to(target)
            optimiser.zero_grad(set_to_none=True)
            # Summed over this member's rows, times world / global size: DDP's average of the
            # members' gradients is then the mean over the global batch.
            out = ddp(x[index])
            step = criterion(out.reshape(-1, 1) if regression else out, y[index], reduction="sum")
            (step * (world / size)).backward()
            optimiser.step()
            total += step.detach()
        dist.all_reduce(total)
        train_loss = total.item() / max(len(x), 1)
        rate = len(x) / max(time.perf_counter() - started, 1e-9)
        scores, _ = scores_on(*validation)
        metrics = {"train.loss": train_loss} | {f"validation.{k}": v for k, v in scores.items()}
        history.append(metrics)
        if early_stopping is not None:
            value = metrics.get(early_stopping.metric)
            if value is not None:
                best, stale = (
                    (value, 0) if _better(value, best, early_stopping) else (best, stale + 1)
                )
                finished = stale >= early_stopping.patience
        done = epoch
        if rank == 0 and on_checkpoint is not None:
            on_checkpoint(
                _snapshot(done, model, optimiser, generator, history, best, stale, finished, target)
            )
        if rank == 0 and on_epoch is not None:
            on_epoch(epoch, metrics, rate)
    final: dict[str, dict[str, float]] = {}
    confusion = None
    for split in ("train", "validation", "test"):
        xs, ys = data.x[split].to(target), data.y[split].to(target)
        final[split], matrix = scores_on(xs, ys)
        if split == "test":
            confusion = matrix
    matrix_list = confusion.tolist() if confusion is not None else None
    return Result(model, done, final, matrix_list, history, rate, stopped)

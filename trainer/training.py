"""The training loop proper: deterministic on CPU for a given seed, resumable from an epoch
checkpoint (model, optimiser, both random generators, history, early-stopping state), one
checkpoint callback and one progress callback per epoch, optional early stopping, final
metrics per split (classification: loss, accuracy and a confusion matrix; regression: loss,
RMSE, MAE and R² in the target's own units), and single-sample inference latency on CPU."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mlbus.families import build
from mlbus.runtime import steady_allocations
from mlbus.schemas.training import FamilyOrigin
from mlbus.trainer.data import Prepared

EpochCallback = Callable[[int, dict[str, float], float], None]  # epoch, metrics, samples/s
#: Scores a split [inputs, targets]: its metrics, and a classifier's confusion matrix (else None).
Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, float], Any]]


@dataclass
class Checkpoint:
    """Everything needed to continue a run after `epoch` exactly as if it had not stopped.

    `rng` is torch's global CPU generator (dropout draws from it); `generator` orders the
    batches; `cuda_rng` is the device generator when training on CUDA."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimiser: dict[str, Any]
    generator: torch.Tensor
    rng: torch.Tensor
    history: list[dict[str, float]]
    best: float | None = None
    stale: int = 0
    finished: bool = False  # early stopping decided at this epoch: no more epochs
    cuda_rng: torch.Tensor | None = None


CheckpointCallback = Callable[[Checkpoint], None]


@dataclass
class Result:
    model: nn.Module
    epochs: int
    metrics: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]] | None
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float = 0.0
    stopped: bool = False  # asked to stop before finishing: metrics are not final


def use_threads(threads: int) -> int:
    """Train on `threads` intra-op threads in the calling thread (torch keeps the count per
    thread); 0 keeps torch's default. The count in force, returned."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def loss_function(task: str, loss: str | None = None) -> Callable[..., torch.Tensor]:
    """The training loss of a task: cross-entropy, or MSE (default) / Huber for regression."""
    if task != "regression":
        return nn.functional.cross_entropy
    return nn.functional.huber_loss if loss == "huber" else nn.functional.mse_loss


def evaluate_regression(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: Prepared, loss: str | None = None
) -> dict[str, float]:
    """Loss (on the scaled targets, as trained) and RMSE, MAE, R² in the target's units."""
    model.eval()
    if not len(x):
        nan = float("nan")
        return {"loss": nan, "rmse": nan, "mae": nan, "r2": nan}
    with torch.no_grad():
        predicted = model(x).reshape(-1, 1)
        value = loss_function("regression", loss)(predicted, y).item()
    p = predicted.double().cpu() * data.target_std + data.target_mean
    t = y.double().cpu() * data.target_std + data.target_mean
    error = p - t
    total = ((t - t.mean()) ** 2).sum().item()
    r2 = 1.0 - (error**2).sum().item() / total if total > 0 else float("nan")
    return {
        "loss": value,
        "rmse": error.pow(2).mean().sqrt().item(),
        "mae": error.abs().mean().item(),
        "r2": r2,
    }


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss and accuracy on one split, and its confusion matrix (rows: truth)."""
    model.eval()
    with torch.no_grad():
        logits = model(x) if len(x) else torch.empty(0, n_classes, device=x.device)
        loss = nn.functional.cross_entropy(logits, y).item() if len(x) else float("nan")
        predicted = logits.argmax(dim=1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=y.device)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    accuracy = (predicted == y).float().mean().item() if len(y) else float("nan")
    return {"loss": loss, "accuracy": accuracy}, confusion.cpu()


def task_parts(
    data: Prepared,
    family: str,
    params: Mapping[str, Any],
    *,
    loss: str | None,
    origin: FamilyOrigin | None,
    target: torch.device,
) -> tuple[nn.Module, Callable[..., torch.Tensor], Scorer]:
    """What a run of `data`'s task trains: the model on `target`, its loss function, and how
    a split is scored (metrics, and a classifier's confusion matrix)."""
    n_classes = 1 if data.task == "regression" else len(data.classes)
    model = build(family, data.input_shape, n_classes, params, origin=origin).to(target)
    return model, loss_function(data.task, loss), scorer(data, model, loss)


def scorer(data: Prepared, model: nn.Module, loss: str | None) -> Scorer:
    """How a split of `data` is scored with `model`'s outputs (any module that maps a split's
    inputs to the trained model's outputs: data-parallel members pass one that shares out
    the forward pass)."""
    regression = data.task == "regression"
    n_classes = 1 if regression else len(data.classes)

    def scores_on(xs: torch.Tensor, ys: torch.Tensor) -> tuple[dict[str, float], Any]:
        if regression:
            return evaluate_regression(model, xs, ys, data, loss), None
        return evaluate(model, xs, ys, n_classes)

    return scores_on


def _better(value: float, best: float | None, rule: Any) -> bool:
    if best is None:
        return True
    if rule.mode == "min":
        return value < best - rule.min_delta
    return value > best + rule.min_delta


@steady_allocations()
def fit(
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
    """Train (or continue `resume`) up to `max_epochs`. After each epoch, `on_checkpoint`
    gets the state to save, then `on_epoch` the metrics: a published epoch is a saved one.
    `should_stop` is asked at every epoch boundary; a stopped run returns `stopped=True`."""
    torch.manual_seed(seed)
    regression = data.task == "regression"
    target = torch.device(device)
    model, criterion, scores_on = task_parts(
        data, family, params, loss=loss, origin=origin, target=target
    )

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
        if resume.cuda_rng is not None and target.type == "cuda":
            torch.cuda.set_rng_state(resume.cuda_rng, target)
        history, best, stale = list(resume.history), resume.best, resume.stale
        done, finished = resume.epoch, resume.finished
    x, y = data.x["train"].to(target), data.y["train"].to(target)
    validation = data.x["validation"].to(target), data.y["validation"].to(target)
    batch = int(params["batch_size"])
    rate, stopped = 0.0, False
    for epoch in range(done + 1, max_epochs + 1):
        if finished:
            break
        if should_stop():
            stopped = True
            break
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=generator).to(target)
        # The loss is summed on the device and read once per epoch: a per-batch `.item()`
        # would synchronise a GPU every step.
        total = torch.zeros((), device=target)
        for i in range(0, len(x), batch):
            index = order[i : i + batch]
            optimiser.zero_grad(set_to_none=True)
            out = model(x[index])
            step = criterion(out.reshape(-1, 1) if regression else out, y[index])
            step.backward()
            optimiser.step()
            total += step.detach() * len(index)
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
        if on_checkpoint is not None:
            on_checkpoint(
                _snapshot(done, model, optimiser, generator, history, best, stale, finished, target)
            )
        if on_epoch is not None:
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


def _snapshot(
    epoch: int,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[dict[str, float]],
    best: float | None,
    stale: int,
    finished: bool,
    device: torch.device,
) -> Checkpoint:
    # Copies on the CPU: the checkpoint must not change while the next epoch trains.
    state = optimiser.state_dict()
    moments = {
        i: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return Checkpoint(
        epoch=epoch,
        model={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        optimiser={"state": moments, "param_groups": copy.deepcopy(state["param_groups"])},
        generator=generator.get_state(),
        rng=torch.get_rng_state(),
        history=list(history),
        best=best,
        stale=stale,
        finished=finished,
        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )


def inference_latency(model: nn.Module, x: torch.Tensor, samples: int = 100) -> dict[str, float]:
    """p50 and p95 in ms of single-row forwards on the CPU (what one serving request
    costs), over `samples` rows of `x` (cycled). Timings: never compare them for equality."""
    cpu = copy.deepcopy(model).to("cpu").eval()
    rows = x.to("cpu")
    if len(rows) == 0:
        return {}
    times = []
    with torch.inference_mode():
        for i in range(5):  # warm-up: first calls allocate
            cpu(rows[i % len(rows)].unsqueeze(0))
        for i in range(samples):
            row = rows[i % len(rows)].unsqueeze(0)
            started = time.perf_counter()
            cpu(row)
            times.append((time.perf_counter() - started) * 1000.0)
    p50, p95 = np.percentile(np.asarray(times), [50, 95])
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95)}

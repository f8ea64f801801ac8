"""The training loop proper: deterministic on CPU for a given seed, one callback per epoch
(the worker publishes `training.progress` from it), optional early stopping, and final
metrics per split with a confusion matrix."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mlbus.families import build
from trainer.data import Prepared

EpochCallback = Callable[[int, dict[str, float], float], None]  # epoch, metrics, samples/s


@dataclass
class Result:
    model: nn.Module
    epochs: int
    metrics: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float = 0.0


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss and accuracy on one split, and its confusion matrix (rows: truth)."""
    model.eval()
    with torch.no_grad():
        logits = model(x) if len(x) else torch.empty(0, n_classes)
        loss = nn.functional.cross_entropy(logits, y).item() if len(x) else float("nan")
        predicted = logits.argmax(dim=1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    accuracy = (predicted == y).float().mean().item() if len(y) else float("nan")
    return {"loss": loss, "accuracy": accuracy}, confusion


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
) -> Result:
    torch.manual_seed(seed)
    n_classes = len(data.classes)
    model = build(family, len(data.features), n_classes, params)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"])
    )
    x, y = data.x["train"], data.y["train"]
    batch = int(params["batch_size"])
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best, stale, rate = None, 0, 0.0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        if should_stop():
            break
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch):
            index = order[i : i + batch]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        rate = len(x) / max(time.perf_counter() - started, 1e-9)
        validation, _ = evaluate(model, data.x["validation"], data.y["validation"], n_classes)
        metrics = {"train.loss": total / max(len(x), 1)} | {
            f"validation.{k}": v for k, v in validation.items()
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, rate)
        if early_stopping is not None:
            value = metrics.get(early_stopping.metric)
            if value is not None:
                better = best is None or (
                    value < best - early_stopping.min_delta if early_stopping.mode == "min"
                    else value > best + early_stopping.min_delta
                )  # fmt: skip
                best, stale = (value, 0) if better else (best, stale + 1)
                if stale >= early_stopping.patience:
                    break
    final: dict[str, dict[str, float]] = {}
    confusion = None
    for split in ("train", "validation", "test"):
        final[split], matrix = evaluate(model, data.x[split], data.y[split], n_classes)
        if split == "test":
            confusion = matrix
    assert confusion is not None
    return Result(model, epoch, final, confusion.tolist(), history, rate)

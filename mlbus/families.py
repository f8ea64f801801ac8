"""Model families, by name: the trainer builds a family's module to train it, the model
server builds the same module to load an artifact's weights into (so both live in the
kernel). A family turns the dataset's input shape, the number of classes and the request's
hyperparameters into a torch module; users add one with `@family("name")` without touching
the worker or the server.

Built in: `mlp` (tabular) and `cnn` (square grey images given as pixel columns: 8x8 digits,
28x28 MNIST-like; the side is the square root of the feature count).

torch is imported when a module is built, not with this module: the API and the workflow
manager check hyperparameters against the families without paying torch's memory at idle.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlbus.errors import Invalid

if TYPE_CHECKING:
    from torch import nn


class InvalidModelSpec(Invalid):
    """A model that can never be built (unknown family, bad hyperparameters): not retryable."""


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[int, int, Mapping[str, Any]], nn.Module]
    defaults: Mapping[str, Any]
    bounds: Mapping[str, tuple[float, float]]
    description: str


FAMILIES: dict[str, Family] = {}


def family(
    name: str,
    *,
    defaults: Mapping[str, Any],
    bounds: Mapping[str, tuple[float, float]],
    description: str,
) -> Callable[[Callable[[int, int, Mapping[str, Any]], nn.Module]], Callable[..., nn.Module]]:
    """Register a model family: `build(n_features, n_classes, hyperparameters) -> Module`."""

    def register(
        build: Callable[[int, int, Mapping[str, Any]], nn.Module],
    ) -> Callable[..., nn.Module]:
        FAMILIES[name] = Family(name, build, dict(defaults), dict(bounds), description)
        return build

    return register


def hyperparameters(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The family's defaults overridden by `given`, checked against its bounds."""
    if name not in FAMILIES:
        raise InvalidModelSpec(
            f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        )
    spec = FAMILIES[name]
    common = {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}
    bounds = {"lr": (1e-6, 1.0), "batch_size": (1, 65536), "weight_decay": (0.0, 1.0)}
    merged = common | dict(spec.defaults)
    bounds |= spec.bounds
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise InvalidModelSpec(
            f"hyperparameter {unknown[0]!r} is not one of {name}'s: {', '.join(sorted(merged))}"
        )
    for key, value in given.items():
        low, high = bounds.get(key, (-math.inf, math.inf))
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise InvalidModelSpec(
                f"hyperparameter {key}={value!r} is out of range [{low:g}, {high:g}]"
            )
        merged[key] = type(merged[key])(value) if isinstance(merged[key], int) else float(value)
    return merged


def build(name: str, n_features: int, n_classes: int, params: Mapping[str, Any]) -> nn.Module:
    return FAMILIES[name].build(n_features, n_classes, params)


@family(
    "mlp",
    defaults={"hidden": 128, "layers": 2, "dropout": 0.1},
    bounds={"hidden": (1, 8192), "layers": (1, 16), "dropout": (0.0, 0.9)},
    description="multi-layer perceptron for tabular data",
)
def _mlp(n_features: int, n_classes: int, p: Mapping[str, Any]) -> nn.Module:
    from torch import nn

    layers: list[nn.Module] = []
    width = n_features
    for _ in range(int(p["layers"])):
        layers += [nn.Linear(width, int(p["hidden"])), nn.ReLU(), nn.Dropout(float(p["dropout"]))]
        width = int(p["hidden"])
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@functools.cache
def _image_cnn() -> type[nn.Module]:
    import torch
    from torch import nn

    class ImageCNN(nn.Module):
        def __init__(self, side: int, n_classes: int, channels: int, dropout: float) -> None:
            super().__init__()
            self.side = side
            self.features = nn.Sequential(
                nn.Conv2d(1, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels * 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(channels * 2, channels * 4, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
            )
            self.head = nn.Sequential(
                nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 4 * 4, n_classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x.view(-1, 1, self.side, self.side)))

    return ImageCNN


@family(
    "cnn",
    defaults={"channels": 16, "dropout": 0.1},
    bounds={"channels": (1, 512), "dropout": (0.0, 0.9)},
    description="small CNN for square grey images given as pixel columns (8x8, 28x28)",
)
def _cnn(n_features: int, n_classes: int, p: Mapping[str, Any]) -> nn.Module:
    side = math.isqrt(n_features)
    if side * side != n_features or side < 4:
        raise InvalidModelSpec(
            f"cnn needs square images as pixel columns; {n_features} features is not a square"
        )
    return _image_cnn()(side, n_classes, int(p["channels"]), float(p["dropout"]))

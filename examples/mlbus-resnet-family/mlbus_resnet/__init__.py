"""A small residual CNN for images [N, C, H, W], as an mlbus model family declared by this
distribution's entry point (`mlbus.families`: resnet = "mlbus_resnet:family")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mlbus.families import Family


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the input (the residual), then relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.body(x))


def build(input_shape: Sequence[int], n_outputs: int, params: Mapping[str, Any]) -> nn.Module:
    """`input_shape` is one sample's: (channels, height, width)."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet takes images [C, H, W], not samples of shape {list(input_shape)}")
    channels, width = input_shape[0], int(params["width"])
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width) for _ in range(int(params["blocks"]))],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, n_outputs),
    )


family = Family(
    name="resnet",
    build=build,
    defaults={"width": 16, "blocks": 2},
    bounds={"width": (1, 512), "blocks": (1, 16)},
    description="small residual CNN for images [C, H, W]",
    tasks=("classification", "regression"),
)

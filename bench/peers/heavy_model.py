"""The heavy model bench/serving_peers.py serves with every model server: plain torch, no
mlbus import, so that the peers' environment loads it from this file as mlbus's does. The
weights come from a fixed seed (nothing downloaded): every server answers with the same model.
"""

from __future__ import annotations

import torch
from torch import nn

SIDE = 28  # 28x28 single-channel images: 784 features in, 10 classes out
N_FEATURES = SIDE * SIDE
N_CLASSES = 10
CHANNELS = 16
HIDDEN = 3072
SEED = 0


class WideCNN(nn.Module):
    """VGG-style: a small convolutional stem and a wide fully connected head. A single sample's
    forward pass is bound by reading the head's weights (~45 MB), which a batch reads once for
    all its rows: batching, not HTTP parsing, decides a server's throughput."""

    def __init__(
        self, side: int = SIDE, n_classes: int = N_CLASSES, channels: int = CHANNELS,
        hidden: int = HIDDEN,
    ) -> None:  # fmt: skip
        super().__init__()
        self.side = side
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, c * 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c * 2 * (side // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, self.side, self.side))


def build() -> WideCNN:
    """The model with its seeded weights, in eval mode."""
    torch.manual_seed(SEED)
    return WideCNN().eval()


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What every server answers: class probabilities of each row (as mlbus's classifiers)."""
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)

"""Small bundled models for the demo, the docs and the tests (no downloads)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoNet", "demo_inputs"]


class DemoNet(nn.Module):
    """A small residual CNN written the way real code often is: with dropout, identities,
    redundant reshapes and casts, and a parameter-only subgraph (``scale.exp()``) that
    can be computed once. Input: ``[N, 1, 8, 8]`` (the size of scikit-learn's digits).
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.keep = nn.Identity()
        self.head = nn.Linear(width, num_classes)
        self.log_scale = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 1.0
        h = self.stem(x)
        h = torch.relu(h + self.block(h)).contiguous()
        h = self.pool(h).flatten(1)
        h = self.keep(self.drop(h)).reshape(h.shape[0], -1)
        logits = self.head(h) * 1
        return logits * self.log_scale.exp() + 0


def demo_inputs(batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 8, 8, generator=g) * 16

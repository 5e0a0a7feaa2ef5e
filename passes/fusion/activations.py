"""``simplify-activations``: canonical activation ops, plus opt-in approximations.

Exact forms (always on), written by pattern rules (``fxopt.Rewrite``):

* ``x * sigmoid(x)`` and ``sigmoid(x) * x`` -> ``silu(x)``
* ``x * relu6(x + 3) / 6`` -> ``hardswish(x)``; ``relu6(x + 3) / 6`` -> ``hardsigmoid(x)``
* ``x * 0.5 * (1 + erf(x / sqrt(2)))`` -> ``gelu(x)``
* ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` -> ``gelu(x, approximate="tanh")``

Opt-in approximations (``approximate=[gelu-tanh]``, ``approximate=[hard]``); they change
numerics, so with them the pass is not semantics-preserving and the manager records
the error instead of rejecting it. Per activation, max |difference| over all inputs
(measured by ``tests/passes/test_activations.py``):

* ``gelu-tanh``: erf GELU -> tanh GELU, at most 4.74e-4;
* ``hard``: sigmoid -> hardsigmoid at most 0.0692, silu -> hardswish at most 0.1423 (hence opt-in).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.ir.dialect import aten
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import PassContext, PassResult, Tolerance, register_pass
from fxopt.passmgr.patterns import Rewrite, RewritePass, RewriteSet

__all__ = ["SimplifyActivationsPass", "APPROXIMATIONS", "ERROR_BOUNDS"]


def _silu(x):
    return x * torch.sigmoid(x)


def _silu_r(x):
    return torch.sigmoid(x) * x


def _hardswish(x):
    return x * F.relu6(x + 3) / 6


def _hardsigmoid(x):
    return F.relu6(x + 3) / 6


def _gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


EXACT_RULES = RewriteSet([
    Rewrite(_silu, lambda x: F.silu(x), name="x*sigmoid(x)"),
    Rewrite(_silu_r, lambda x: F.silu(x), name="sigmoid(x)*x"),
    Rewrite(_hardswish, lambda x: F.hardswish(x), name="x*relu6(x+3)/6"),
    Rewrite(_hardsigmoid, lambda x: F.hardsigmoid(x), name="relu6(x+3)/6"),
    Rewrite(_gelu_erf, lambda x: F.gelu(x), name="erf-gelu"),
    Rewrite(_gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), name="tanh-gelu"),
])

APPROXIMATIONS = ("gelu-tanh", "hard")
#: max |approx(x) - exact(x)| over all x, per approximation (checked in the tests)
ERROR_BOUNDS = {"gelu-tanh": 4.74e-4, "hard-sigmoid": 0.0692, "hard-swish": 0.1423}


@register_pass
class SimplifyActivationsPass(RewritePass):
    """Rewrite hand-written activations into their ATen ops; opt-in approximations (see module docs)."""

    name = "simplify-activations"
    rules = EXACT_RULES
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)

    from dataclasses import dataclass as _dc

    @_dc(frozen=True)
    class Config:
        approximate: tuple = ()

        def __post_init__(self) -> None:
            if isinstance(self.approximate, str):
                object.__setattr__(self, "approximate", (self.approximate,))
            bad = set(self.approximate) - set(APPROXIMATIONS)
            if bad:
                from fxopt.errors import PipelineError
                raise PipelineError(f"simplify-activations: unknown approximation(s) {sorted(bad)}; "
                                    f"choose from {list(APPROXIMATIONS)}")

    preserves_semantics = True  # the default (exact forms only): what `fxopt passes` lists

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        # opt-in approximations change numerics: this instance is then checked by its recorded error
        self.preserves_semantics = not self.config.approximate

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = super().run(gm, ctx)
        swaps = 0
        approx = set(self.config.approximate)
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if "gelu-tanh" in approx and node.target is aten.gelu.default and \
                    node.kwargs.get("approximate", "none") == "none" and len(node.args) == 1:
                node.kwargs = {"approximate": "tanh"}
                swaps += 1
            elif "hard" in approx and node.target is aten.sigmoid.default:
                node.target = aten.hardsigmoid.default
                swaps += 1
            elif "hard" in approx and node.target is aten.silu.default:
                node.target = aten.hardswish.default
                swaps += 1
        if swaps:
            propagate_meta(gm)
        info = dict(result.info)
        info["approximated"] = swaps
        return PassResult(result.changed or bool(swaps), frozenset(), info)

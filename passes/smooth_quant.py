"""``smooth-quant``: migrate activation outliers into the weights before int8 quantization.

Transformer activations have a few channels with values 10-100x larger than the rest,
which ruins per-tensor/per-token int8 scales. SmoothQuant (Xiao et al., 2023) divides
each input channel j of a linear's activation by ``s_j`` and multiplies the weight's
column j by the same ``s_j``, with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``: exact
in float, but both factors become easy to quantize.

The division is folded into the LayerNorm that produces the activation when every user
of that LayerNorm is one of the smoothed linears; otherwise (BERT's post-norm residual,
the FFN's GELU output) a ``mul`` by ``1/s`` is inserted before the linears (one cheap
elementwise op). Linears that share an input (Q, K, V) share ``s``.

``alpha`` (0..1): how much of the activation range moves into the weights (0.5 is the
paper's default). With ``alpha=none`` the pass reads ``compile(..., smoothquant=ALPHA)``,
falling back to ``default`` (``int8-dynamic`` sets ``default=0.5``; ``smoothquant=False``
turns it off; ``int8`` leaves it off unless asked).
Activation ranges come from the calibration data, or the example inputs.
Tolerance: float reassociation, atol 1e-4 / rtol 1e-3.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.calibrate import Inputs, observe
from fxopt.dialect import aten, is_layer_norm, module_path
from fxopt.errors import PipelineError
from fxopt.meta import propagate_meta
from fxopt.observers import MinMaxObserver
from fxopt.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.qspec import QSpec
from fxopt.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["SmoothQuantPass"]


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = getattr(mod, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, attr, value)


@register_pass
class SmoothQuantPass(Pass):
    """Move activation outliers into linear weights (exact in float); see the module docs."""

    name = "smooth-quant"
    reads_options = ("smoothquant", "calibration_inputs", "calibration_batches")
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)

    @dataclass(frozen=True)
    class Config:
        alpha: Any = None
        default: Any = None
        skip: tuple = ()

        def __post_init__(self) -> None:
            object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
            if self.alpha is not None and not 0 <= float(self.alpha) <= 1:
                raise PipelineError(f"smooth-quant: alpha must be in [0, 1], got {self.alpha}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        alpha = self.config.alpha
        if alpha is None:
            alpha = ctx.options.get("smoothquant", self.config.default)
        if alpha is None or alpha is False:
            return PassResult(False, info={"off": "pass smoothquant=ALPHA (e.g. 0.5) to turn it on"})
        alpha = float(alpha)
        if not 0 <= alpha <= 1:
            raise PipelineError(f"smoothquant must be in [0, 1], got {alpha}")
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is aten.linear.default and isinstance(n.args[0], fx.Node):
                w = attr_tensor(gm, n.args[1])
                if w is None or not w.is_floating_point() or w.dim() != 2:
                    continue
                if any(fnmatch.fnmatchcase(module_path(n), g) for g in self.config.skip):
                    continue
                v = n.args[0].meta.get("val")
                if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
                    groups.setdefault(n.args[0], []).append(n)
        if not groups:
            return PassResult(False)
        spec = QSpec(granularity="channel", axis=-1)
        observers = {x: MinMaxObserver(spec) for x in groups}
        data = ctx.calibration if ctx.calibration is not None else [Inputs(ctx.args, ctx.kwargs)]
        observe(gm, observers, data, inputs=ctx.options.get("calibration_inputs"), example=(ctx.args, ctx.kwargs),
                max_batches=ctx.options.get("calibration_batches"), progress=ctx.options.get("progress"))
        folded = inserted = 0
        for x, linears in groups.items():
            lo, hi = observers[x].range()
            amax = torch.maximum(-lo, hi)
            wmax = torch.stack([attr_tensor(gm, lin.args[1]).detach().abs().amax(0) for lin in linears]).amax(0)
            s = amax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
            s = torch.where((amax > 0) & (wmax > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)
            for lin in linears:
                w = attr_tensor(gm, lin.args[1]).detach()
                _set_attr(gm, str(lin.args[1].target), w * s)
            if self._fold_into_norm(gm, x, linears, s):
                folded += 1
                continue
            owner = module_path(linears[0])
            mod = gm.get_submodule(owner) if owner else gm
            name, i = "smooth_inv", 1
            while hasattr(mod, name):
                name, i = f"smooth_inv_{i}", i + 1
            mod.register_buffer(name, (1 / s).contiguous())
            first = min(linears)  # fx nodes compare by graph position
            with gm.graph.inserting_before(first):
                inv = gm.graph.get_attr(f"{owner}.{name}" if owner else name)
                xs = gm.graph.call_function(aten.mul.Tensor, (x, inv))
            copy_meta(xs, first)
            for lin in linears:
                lin.replace_input_with(x, xs)
            inserted += 1
        erase_dead(gm)
        propagate_meta(gm)
        return PassResult(True, frozenset({"shapes", "cost"}) if not inserted else frozenset({"shapes"}),
                          {"groups": len(groups), "folded_into_norm": folded, "scale_ops": inserted, "alpha": alpha})

    @staticmethod
    def _fold_into_norm(gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node], s: torch.Tensor) -> bool:
        if not (is_layer_norm(x) and x.target is aten.layer_norm.default) or set(x.users) != set(linears):
            return False
        w_node = x.args[2] if len(x.args) > 2 else x.kwargs.get("weight")
        b_node = x.args[3] if len(x.args) > 3 else x.kwargs.get("bias")
        w, b = attr_tensor(gm, w_node), attr_tensor(gm, b_node)
        if w is None or b is None or w.shape != s.shape:
            return False
        _set_attr(gm, str(w_node.target), w.detach() / s)
        _set_attr(gm, str(b_node.target), b.detach() / s)
        return True

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

Shared weights: a weight read by linears with different inputs (ALBERT's one layer
applied at every depth, DeBERTa's relative-position projections reusing the key and
query weights) is scaled once, so every input of those linears is divided by the same
``s``, computed over all of them. A weight that anything but such a linear reads
(GPT-2's output projection tied to the token embedding) is left unsmoothed, with every
linear coupled to it; so is a norm whose parameters another norm shares (the scale is
then a ``mul``, never folded twice).

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

from fxopt.quant.calibrate import Inputs, observe
from fxopt.ir.dialect import aten, is_layer_norm, module_path
from fxopt.errors import PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.quant.observers import MinMaxObserver
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.quant.qspec import QSpec
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["SmoothQuantPass"]


def _set_attr(gm: fx.GraphModule, targets: Any, value: torch.Tensor) -> None:
    """Point every target in ``targets`` (aliases of one tensor) at one new tensor ``value``."""
    new = None
    for target in [targets] if isinstance(targets, str) else targets:
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        old = getattr(mod, attr)
        if new is None:
            new = torch.nn.Parameter(value, requires_grad=old.requires_grad) \
                if isinstance(old, torch.nn.Parameter) else value
        setattr(mod, attr, new)


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data (aliases under two names, or read by several get_attrs, agree)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensor_uses(gm: fx.GraphModule) -> tuple[dict, dict]:
    """key -> every (reader node, argument position) of that tensor; key -> attribute targets."""
    uses: dict[tuple, list] = {}
    targets: dict[tuple, set] = {}
    for node in gm.graph.nodes:
        t = attr_tensor(gm, node)
        if t is None:
            continue
        k = _key(t)
        targets.setdefault(k, set()).add(str(node.target))
        readers = uses.setdefault(k, [])
        for user in node.users:
            readers += [(user, i) for i, a in enumerate(user.args) if a is node]
            readers += [(user, name) for name, a in user.kwargs.items() if a is node]
    return uses, targets


def _coupled(groups: dict, uses: dict, gm: fx.GraphModule) -> tuple[list[list], int]:
    """Input groups joined by shared weights (each list shares one scale), and how many
    linears are left out because their weight has other readers."""
    parent = {x: x for x in groups}

    def find(x: fx.Node) -> fx.Node:
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    linears = {lin for ls in groups.values() for lin in ls}
    blocked = set()
    for lin in linears:
        readers = uses[_key(attr_tensor(gm, lin.args[1]))]
        xs = {u.args[0] for u, i in readers if u in linears and i == 1}
        if any(u not in linears or i != 1 for u, i in readers):
            blocked |= xs
        first = find(lin.args[0])
        for x in xs:
            parent[find(x)] = first
    joined: dict[fx.Node, list] = {}
    for x in groups:
        joined.setdefault(find(x), []).append(x)
    out, left = [], 0
    for xs in joined.values():
        if any(x in blocked for x in xs):
            left += sum(len(groups[x]) for x in xs)
        else:
            out.append(xs)
    return out, left


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

    def with_options(self, options: dict) -> "SmoothQuantPass":
        """``alpha=none`` with ``compile(..., smoothquant=A)``: the pass with ``alpha=A`` (or off, for False)."""
        if self.config.alpha is not None or "smoothquant" not in options:
            return self
        value = options["smoothquant"]
        if value is None or value is False:
            return type(self)(config=self.Config(skip=self.config.skip))  # off, and says so: no alpha, no default
        return type(self)(config=self.Config(alpha=float(value), skip=self.config.skip))

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
        uses, targets = _tensor_uses(gm)
        coupled, left_out = _coupled(groups, uses, gm)
        scales = {}
        for xs in coupled:   # inputs whose linears share weights get one scale
            amax = torch.stack([torch.maximum(-lo, hi) for lo, hi in (observers[x].range() for x in xs)]).amax(0)
            weights = {}
            for x in xs:
                for lin in groups[x]:
                    w = attr_tensor(gm, lin.args[1])
                    weights[_key(w)] = w
            wmax = torch.stack([w.detach().abs().amax(0) for w in weights.values()]).amax(0)
            s = amax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
            s = torch.where((amax > 0) & (wmax > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)
            for k, w in weights.items():     # each distinct weight once, all its names together
                _set_attr(gm, sorted(targets[k]), w.detach() * s)
            scales.update({x: s for x in xs})
        for x, s in scales.items():
            linears = groups[x]
            if self._fold_into_norm(gm, x, linears, s, uses):
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
        if not scales:
            return PassResult(False, info={"left_out": left_out})
        erase_dead(gm)
        propagate_meta(gm)
        return PassResult(True, frozenset({"shapes", "cost"}) if not inserted else frozenset({"shapes"}),
                          {"groups": len(scales), "shared": sum(len(xs) > 1 for xs in coupled),
                           "left_out": left_out, "folded_into_norm": folded, "scale_ops": inserted,
                           "alpha": alpha})

    @staticmethod
    def _fold_into_norm(gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node], s: torch.Tensor,
                        uses: dict) -> bool:
        if not (is_layer_norm(x) and x.target is aten.layer_norm.default) or set(x.users) != set(linears):
            return False
        w_node = x.args[2] if len(x.args) > 2 else x.kwargs.get("weight")
        b_node = x.args[3] if len(x.args) > 3 else x.kwargs.get("bias")
        w, b = attr_tensor(gm, w_node), attr_tensor(gm, b_node)
        if w is None or b is None or w.shape != s.shape:
            return False
        if any(len(uses.get(_key(t), ())) != 1 for t in (w, b)):
            return False   # a norm shared with other inputs (ALBERT): dividing it would divide them too
        _set_attr(gm, str(w_node.target), w.detach() / s)
        _set_attr(gm, str(b_node.target), b.detach() / s)
        return True

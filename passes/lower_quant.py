"""``lower-quant``: replace the simulated QDQ patterns with real integer CPU kernels.

Matches what ``insert-qdq`` wrote and emits the ``torch.ops.fxopt`` kernels of
:mod:`fxopt.kernels.cpu_quant`:

==========================================================  =============================
pattern                                                     kernel
==========================================================  =============================
``linear(dq(q(x, s, z)), dq(W8), b)``, int8 per channel      ``linear_int8`` (fbgemm)
``linear(dq(q(x, dynamic_scale(x))), dq(W8), b)``            ``linear_int8_dynamic``
``q(relu?(conv2d(dq(q(x)), dq(W8), b)))`` then ``dq``        ``conv2d_int8`` (fbgemm)
``linear(x, dq(Wq), b)`` (weight-only int8/int4)             ``linear_wq``
``conv2d(x, dq(W8), b)`` (weight-only)                       ``conv2d_wq``
``embedding(dq(Wq), ids)``                                   ``embedding_wq``
==========================================================  =============================

4-bit weights are packed two per byte here. A pattern whose specs the kernels do not
support (asymmetric int8 weights for fbgemm, say) stays simulated and is listed in the
record as ``kept``. The lowered model agrees with the simulated one to integer rounding
(``check_layers`` runs every int8 kernel next to its simulated formula on the example
inputs and fails the pass, which the manager rolls back, when they differ beyond float
rounding; end to end, rare rounding flips grow through deep nets, so the manager
records the output change instead of bounding it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

import fxopt.kernels.cpu_quant  # noqa: F401  (registers the kernels)
import fxopt.qops  # noqa: F401  (registers quantize/dequantize)
from fxopt.dialect import aten, arg
from fxopt.kernels.cpu_quant import pack_int4
from fxopt import qspec as qs
from fxopt.qspec import QSpec
from fxopt.meta import propagate_meta
from fxopt.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["LowerQuantPass"]

fxq = torch.ops.fxopt
_Q, _DQ, _DYN = fxq.quantize.default, fxq.dequantize.default, fxq.dynamic_scale.default
_RELU = {aten.relu.default, aten.relu_.default}


@dataclass
class _W:
    q: fx.Node
    scale: fx.Node
    zp: fx.Node
    group_size: int
    symmetric: bool


def _weight(gm: fx.GraphModule, node: Any) -> _W | None:
    """``dq(get_attr q, get_attr s, get_attr z, g)`` of a stored weight."""
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q, s, z, g = node.args
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (q, s, z)):
        return None
    qt, zt = attr_tensor(gm, q), attr_tensor(gm, z)
    if qt is None or zt is None or qt.dtype != torch.int8:
        return None
    return _W(q, s, z, g, bool((zt == 0).all()))


def _bits_from_meta(user: fx.Node) -> int:
    """4 for an int4 (or narrower) weight spec recorded by insert-qdq, else 8."""
    spec = (user.meta.get("fxopt_quant") or {}).get("weight")
    if not spec:
        return 8
    q = QSpec.parse(spec)
    return 4 if q.signed and q.bits <= 4 else 8


def _activation(gm: fx.GraphModule, node: Any) -> tuple[str, fx.Node, Any] | None:
    """('static', x, (scale, zp)) or ('dynamic', x, None) for ``dq(q(x, ...))``."""
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q = node.args[0]
    if not (isinstance(q, fx.Node) and q.target is _Q):
        return None
    x, s, z, qmin, qmax, g = q.args
    if g:
        return None
    if isinstance(s, fx.Node) and s.target is _DYN and (qmin, qmax) == (-127, 127):
        return "dynamic", x, None
    st, zt = attr_tensor(gm, s), attr_tensor(gm, z)
    if st is None or zt is None or st.numel() != 1 or (qmin, qmax) != (0, 255):
        return None
    return "static", x, (float(st), int(zt))


def _replace(gm: fx.GraphModule, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    copy_meta(new, old)
    for k in ("fxopt_quant",):
        if k in old.meta:
            new.meta[k] = old.meta[k]
    old.replace_all_uses_with(new)
    name = old.name
    gm.graph.erase_node(old)
    new._rename(name)  # the kernel keeps the layer's node name (fxopt.diff shows it as retyped)
    return new


def _pack4(gm: fx.GraphModule, w: _W) -> fx.Node:
    """A packed uint8 copy of an int4 weight stored as int8 (cached per weight)."""
    packed_name = str(w.q.target) + "_packed"
    owner, _, attr = packed_name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if not hasattr(mod, attr):
        mod.register_buffer(attr, pack_int4(attr_tensor(gm, w.q)))
    with gm.graph.inserting_before(w.q):
        return gm.graph.get_attr(packed_name)


@register_pass
class LowerQuantPass(Pass):
    """Swap simulated quantize/dequantize patterns for integer CPU kernels (see module docs)."""

    name = "lower-quant"
    # outputs move by rounding flips that grow through deep nets; each layer is checked instead
    preserves_semantics = False

    @dataclass(frozen=True)
    class Config:
        pack_int4: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        kept: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or getattr(node, "_erased", False):
                continue
            kind = self._lower(gm, node)
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
            elif node.meta.get("fxopt_quant") and node.target in (aten.linear.default, aten.conv2d.default,
                                                                   aten.embedding.default):
                kept.append(node.name)
        if not counts:
            return PassResult(False, info={"kept": kept})
        erase_dead(gm)
        propagate_meta(gm)
        worst = check_layers(gm, ctx)
        return PassResult(True, frozenset({"shapes"}), {"lowered": counts, "kept": kept,
                                                         "worst_layer_error": worst})

    def _wargs(self, gm: fx.GraphModule, w: _W, bits: int) -> tuple:
        q = _pack4(gm, w) if bits == 4 and self.config.pack_int4 else w.q
        return q, w.scale, w.zp, w.group_size, 4 if bits == 4 and self.config.pack_int4 else 8

    def _lower(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        t = node.target
        bits = _bits_from_meta(node)
        if t is aten.embedding.default:
            w = _weight(gm, node.args[0])
            if w is None:
                return None  # (padding_idx and the other options only matter for gradients)
            q, s, z, g, b = self._wargs(gm, w, bits)
            _replace(gm, node, fxq.embedding_wq.default, (q, node.args[1], s, z, g, b))
            return f"embedding_int{b}"
        if t is aten.linear.default:
            x_node, w_node, bias = node.args[0], node.args[1], arg(node, 2, "bias")
            w = _weight(gm, w_node)
            if w is None:
                return None
            act = _activation(gm, x_node)
            int8_channel = bits == 8 and w.symmetric and w.group_size == 0
            if act is not None and act[0] == "dynamic" and int8_channel:
                _replace(gm, node, fxq.linear_int8_dynamic.default, (act[1], w.q, w.scale, bias))
                return "linear_int8_dynamic"
            if act is not None and act[0] == "static" and int8_channel:
                (s, z) = act[2]
                _replace(gm, node, fxq.linear_int8.default, (act[1], w.q, w.scale, bias, s, z))
                return "linear_int8"
            if act is None and not (isinstance(x_node, fx.Node) and x_node.target is _DQ):
                q, s, z, g, b = self._wargs(gm, w, bits)
                _replace(gm, node, fxq.linear_wq.default, (x_node, q, s, z, bias, g, b))
                return f"linear_int{b}_weight"
            return None
        if t is aten.conv2d.default:
            return self._conv(gm, node)
        return None

    def _conv(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        x_node, w_node = node.args[0], node.args[1]
        bias = arg(node, 2, "bias")
        stride, padding = list(_pair(arg(node, 3, "stride", 1))), arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            return None
        padding, dilation = list(_pair(padding)), list(_pair(arg(node, 5, "dilation", 1)))
        groups = arg(node, 6, "groups", 1)
        w = _weight(gm, w_node)
        if w is None or w.group_size:
            return None
        act = _activation(gm, x_node)
        if act is None and not (isinstance(x_node, fx.Node) and x_node.target is _DQ):
            _replace(gm, node, fxq.conv2d_wq.default, (x_node, w.q, w.scale, w.zp, bias, stride, padding,
                                                      dilation, groups))
            return "conv2d_int8_weight"
        if act is None or act[0] != "static" or not w.symmetric:
            return None
        out, relu = node, False
        if len(node.users) == 1:
            u = next(iter(node.users))
            if u.op == "call_function" and u.target in _RELU:
                out, relu = u, True
        if len(out.users) != 1:
            return None
        q_out = next(iter(out.users))
        if q_out.target is not _Q or q_out.args[3:] != (0, 255, 0):
            return None
        so, zo = attr_tensor(gm, q_out.args[1]), attr_tensor(gm, q_out.args[2])
        dqs = list(q_out.users)
        if so is None or zo is None or so.numel() != 1 or not all(d.target is _DQ for d in dqs):
            return None
        (s, z) = act[2]
        with gm.graph.inserting_before(q_out):
            new = gm.graph.call_function(fxq.conv2d_int8.default, (
                act[1], w.q, w.scale, bias, stride, padding, dilation, groups, s, z, float(so), int(zo), relu))
        copy_meta(new, node)
        new.meta["fxopt_quant"] = node.meta.get("fxopt_quant")
        # the kernel's output already lies on the output grid: q/dq of it is the identity. Quantized
        # consumers keep reading dq(q(new)) (so they match the static pattern); others read new.
        q_out.replace_input_with(out, new)
        for d in dqs:
            for u in list(d.users):
                if not (u.op == "call_function" and u.target in (aten.linear.default, aten.conv2d.default)
                        and u.args[0] is d and u.meta.get("fxopt_quant")):
                    u.replace_input_with(d, new)
        for dead in ([out] if relu else []) + [node]:
            gm.graph.erase_node(dead)
        new._rename(node.name)
        return "conv2d_int8_relu" if relu else "conv2d_int8"


# ---------------------------------------------------------------- per-layer check
def _sim_linear_static(x, w_q, w_scale, bias, s, z):
    xs = qs.dequantize(qs.quantize(x.float(), torch.tensor(s), torch.tensor(z), 0, 255), torch.tensor(s), torch.tensor(z))
    return F.linear(xs, w_q.float() * w_scale.reshape(-1, 1), bias)


def _sim_linear_dynamic(x, w_q, w_scale, bias):
    st = torch.ops.fxopt.dynamic_scale(x, 127)
    z = torch.zeros((), dtype=torch.int32)
    xs = qs.dequantize(qs.quantize(x.float(), st, z, -127, 127), st, z)
    return F.linear(xs, w_q.float() * w_scale.reshape(-1, 1), bias)


def _sim_conv(x, w_q, w_scale, bias, stride, padding, dilation, groups, s, z, so, zo, relu):
    t = torch.tensor
    xs = qs.dequantize(qs.quantize(x.float(), t(s), t(z), 0, 255), t(s), t(z))
    y = F.conv2d(xs, w_q.float() * w_scale.reshape(-1, 1, 1, 1), bias, stride, padding, dilation, groups)
    y = y.relu() if relu else y
    return qs.dequantize(qs.quantize(y, t(so), t(zo), 0, 255), t(so), t(zo))


_SIM = {fxq.linear_int8.default: _sim_linear_static, fxq.linear_int8_dynamic.default: _sim_linear_dynamic,
        fxq.conv2d_int8.default: _sim_conv}


class _Checked:
    """Stands in for a kernel during the check: runs it and its simulated formula on the same inputs."""

    def __init__(self, node: fx.Node, errors: dict):
        self.kernel, self.sim, self.node, self.errors = node.target, _SIM[node.target], node, errors
        self.__name__ = f"check_{node.name}"

    def __call__(self, *args: Any) -> torch.Tensor:
        out = self.kernel(*args)
        ref = self.sim(*args)
        err = float((out - ref).abs().max()) if out.numel() else 0.0
        # a static conv requantizes its output: one step of the output scale is rounding
        allowed = 1e-4 * float(ref.abs().max()) + 1e-5 + (2.01 * args[10] if self.kernel is
                                                         fxq.conv2d_int8.default else 0.0)
        self.errors[self.node.name] = (err, allowed)
        return out


def check_layers(gm: fx.GraphModule, ctx: PassContext) -> float:
    """Run each int8 kernel next to its simulated formula on the example inputs.

    Raises ``PassError`` naming the first layer whose kernel disagrees with the
    simulation beyond float rounding (one output step for requantizing convs); returns
    the largest error seen.
    """
    from fxopt.errors import PassError
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SIM]
    if not nodes:
        return 0.0
    errors: dict[str, tuple[float, float]] = {}
    for n in nodes:
        n.target = _Checked(n, errors)
    gm.recompile()
    try:
        ctx.run(gm)
    finally:
        for n in nodes:
            n.target = n.target.kernel
        gm.recompile()
    for name, (err, allowed) in errors.items():
        if err > allowed:
            raise PassError("lower-quant", f"the kernel of '{name}' differs from its simulated QDQ form by "
                            f"{err:.3g} (allowed {allowed:.3g})",
                            remedy=f"keep the layer simulated: insert-qdq(skip=['{name}']) (or its module path), "
                            "and report the case")
    return max((e for e, _ in errors.values()), default=0.0)


def _pair(v: Any) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == 2 else (v[0], v[0])
    return (v, v)

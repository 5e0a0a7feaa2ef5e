"""``canonicalize``: rewrite hand-written forms into the ops the other passes match.

* ``x @ W.t() + b``, ``addmm(b, x, W.t())``, ``mm(x, W.t())`` and ``x @ W.t()`` become
  ``linear(x, W, b)`` when ``W`` (2-D) and ``b`` (1-D) are weights;
* ``x @ V`` with a 2-D weight ``V`` stored as ``[in, out]`` becomes ``linear(x, V.t())``
  (the transposed copy replaces ``V`` when nothing else reads it).

Quantization, pruning and low-rank passes then see every dense layer as a
``linear``. Tolerance: atol/rtol 1e-5 (a different GEMM kernel may round differently).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.dialect import aten
from fxopt.meta import propagate_meta
from fxopt.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.rewrite_utils import add_param, attr_tensor, copy_meta, erase_dead

__all__ = ["CanonicalizePass"]

_MM = {aten.matmul.default, aten.mm.default}
_T = {aten.t.default}


def _weight_of_transpose(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """W when ``node`` is t(W) / transpose(W, 0, 1) / permute(W, [1, 0]) of a 2-D weight."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    ok = node.target in _T or (node.target is aten.transpose.int and {node.args[1], node.args[2]} in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1})) \
        or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])
    if not ok:
        return None
    w = node.args[0]
    t = attr_tensor(gm, w)
    return w if t is not None and t.dim() == 2 else None  # type: ignore[return-value]


@register_pass
class CanonicalizePass(Pass):
    """Turn matmul/mm/addmm plus bias adds on weights into ``linear`` (see module docs)."""

    name = "canonicalize"
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rewrites = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            x = w = b = None
            replace = node
            if node.target in _MM:
                x, rhs = node.args[0], node.args[1]
                w = _weight_of_transpose(gm, rhs)
                if w is None:
                    v = attr_tensor(gm, rhs)
                    if v is None or v.dim() != 2 or len(rhs.users) != 1:  # type: ignore[union-attr]
                        continue
                    w = add_param(gm, f"{rhs.name}_t", v.t(), node, v.requires_grad)  # type: ignore[union-attr]
                    copy_meta(w, node)
                # fuse a following bias add
                users = list(node.users)
                if len(users) == 1 and users[0].target is aten.add.Tensor and len(users[0].args) == 2:
                    add = users[0]
                    other = add.args[1] if add.args[0] is node else add.args[0]
                    bt = attr_tensor(gm, other)
                    wt = attr_tensor(gm, w)
                    if bt is not None and bt.dim() == 1 and wt is not None and bt.shape[0] == wt.shape[0] \
                            and "alpha" not in add.kwargs:
                        b, replace = other, add
            elif node.target is aten.addmm.default and not node.kwargs:
                b, x, rhs = node.args[0], node.args[1], node.args[2]
                w = _weight_of_transpose(gm, rhs)
                bt = attr_tensor(gm, b)
                if w is None or bt is None or bt.dim() != 1:
                    continue
            else:
                continue
            if not isinstance(x, fx.Node) or not isinstance(x.meta.get("val"), torch.Tensor) or x.meta["val"].dim() < 1:
                continue
            with gm.graph.inserting_before(replace):
                lin = gm.graph.call_function(aten.linear.default, (x, w, b))
            copy_meta(lin, node)
            replace.replace_all_uses_with(lin)
            rewrites += 1
        if rewrites:
            erase_dead(gm)
            propagate_meta(gm)
        return PassResult(bool(rewrites), frozenset(), {"rewrites": rewrites})

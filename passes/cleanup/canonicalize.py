"""``canonicalize``: rewrite hand-written forms into the ops the other passes match.

* ``x @ W.t() + b``, ``addmm(b, x, W.t())``, ``mm(x, W.t())`` and ``x @ W.t()`` become
  ``linear(x, W, b)`` when ``W`` (2-D) and ``b`` (1-D) are weights;
* ``x @ V`` and ``addmm(b, x, V)`` with a 2-D weight ``V`` stored as ``[in, out]``
  (Hugging Face's ``Conv1D`` in GPT-2) become ``linear(x, V.t(), b)`` (the transposed
  copy replaces ``V``; only when nothing else reads it);
* a linear between ``view(x, [-1, in])`` and a view back to ``x``'s leading sizes
  (how ``Conv1D`` and other hand-written layers flatten ``[batch, seq, in]``) runs on
  ``x`` itself: ``linear`` takes any number of leading dimensions, and passes that
  follow channels (pruning) see no views with literal sizes.

Quantization, pruning and low-rank passes then see every dense layer as a
``linear``. Tolerance: atol/rtol 1e-5 (a different GEMM kernel may round differently).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.ir.dialect import aten
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import add_param, attr_tensor, copy_meta, erase_dead

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


def _transposed_copy(gm: fx.GraphModule, rhs: object, node: fx.Node) -> fx.Node | None:
    """A new ``[out, in]`` weight for a 2-D ``[in, out]`` weight ``rhs`` that only ``node`` reads."""
    v = attr_tensor(gm, rhs)
    if v is None or v.dim() != 2 or len(rhs.users) != 1:  # type: ignore[union-attr]
        return None
    w = add_param(gm, f"{rhs.name}_t", v.t(), node, v.requires_grad)  # type: ignore[union-attr]
    copy_meta(w, node)
    return w


def _is_input(x: object) -> bool:
    return isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].dim() >= 1


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _same_sizes(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _skip_flatten(lin: fx.Node) -> fx.Node | None:
    """For ``view(linear(view(x, [-1, in])), [*x.shape[:-1], out])`` return ``x``."""
    flat = lin.args[0]
    if not isinstance(flat, fx.Node) or flat.target not in _VIEWS or len(flat.users) != 1 or \
            len(lin.users) != 1 or not isinstance(flat.args[0], fx.Node):
        return None
    x, out = flat.args[0], next(iter(lin.users))
    xv, fv, ov = (n.meta.get("val") for n in (x, flat, out))
    if out.target not in _VIEWS or not all(isinstance(v, torch.Tensor) for v in (xv, fv, ov)) or \
            xv.dim() < 3 or fv.dim() != 2 or not statically_known_true(fv.shape[1] == xv.shape[-1]):
        return None
    return x if _same_sizes(tuple(ov.shape[:-1]), tuple(xv.shape[:-1])) else None


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
                if not _is_input(x):
                    continue
                w = _weight_of_transpose(gm, rhs) or _transposed_copy(gm, rhs, node)
                if w is None:
                    continue
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
                bt, vt = attr_tensor(gm, b), attr_tensor(gm, rhs)
                if bt is None or bt.dim() != 1 or not _is_input(x):
                    continue
                w = _weight_of_transpose(gm, rhs)
                if w is None and vt is not None and vt.dim() == 2 and vt.shape[1] == bt.shape[0]:
                    w = _transposed_copy(gm, rhs, node)      # Conv1D: addmm(b, x, W[in, out])
                if w is None:
                    continue
            else:
                continue
            with gm.graph.inserting_before(replace):
                lin = gm.graph.call_function(aten.linear.default, (x, w, b))
            copy_meta(lin, node)
            replace.replace_all_uses_with(lin)
            rewrites += 1
        if rewrites:
            erase_dead(gm)       # the replaced matmuls still read the flattening views
            propagate_meta(gm)
        for lin in list(gm.graph.nodes):
            if lin.op == "call_function" and lin.target is aten.linear.default and "val" in lin.meta:
                x = _skip_flatten(lin)
                if x is None:
                    continue
                out = next(iter(lin.users))
                with gm.graph.inserting_before(out):
                    new = gm.graph.call_function(aten.linear.default, (x, *lin.args[1:]), dict(lin.kwargs))
                copy_meta(new, lin)
                out.replace_all_uses_with(new)
                gm.graph.erase_node(out)
                gm.graph.erase_node(lin)
                rewrites += 1
        if rewrites:
            erase_dead(gm)
            propagate_meta(gm)
        return PassResult(bool(rewrites), frozenset(), {"rewrites": rewrites})

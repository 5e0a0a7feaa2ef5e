"""Helpers shared by rewrite passes: new parameters, node arguments, removing dead weights."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import arg, get_attr_tensor, is_impure
from fxopt.ir.graph_utils import remove_unused_attributes

__all__ = ["add_param", "attr_tensor", "arg", "erase_dead", "copy_meta", "unpack_split_params",
           "unpack_packed_projections", "unpack_split_projections"]


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None when ``node`` is something else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = get_attr_tensor(gm, node)
        return t if isinstance(t, torch.Tensor) else None
    return None


def add_param(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node,
              requires_grad: bool = True, buffer: bool | None = None) -> fx.Node:
    """Register ``value`` as a new root attribute named after ``base`` and return a get_attr for it.

    A parameter when it is floating point, a buffer otherwise; ``buffer=True`` keeps a float
    tensor a buffer (batch-norm statistics, masks, scales), ``buffer=False`` insists on a parameter."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    value = value.detach().contiguous()
    if not buffer and (value.is_floating_point() or buffer is False):
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=requires_grad))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def erase_dead(gm: fx.GraphModule) -> int:
    """Remove unused pure nodes and the attributes nobody reads any more."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not is_impure(node):
            gm.graph.erase_node(node)
            removed += 1
    remove_unused_attributes(gm)
    return removed


def copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for k in ("nn_module_stack", "stack_trace"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def unpack_split_params(gm: fx.GraphModule) -> int:
    """Give every part of a packed weight its own attribute; returns how many weights were unpacked.

    A parameter read only through ``split`` along dim 0 (``nn.MultiheadAttention``'s
    ``in_proj_weight`` / ``in_proj_bias``, chunked into Q, K and V) becomes one parameter
    per part, so passes can rewrite each projection alone (pruning its heads, say).
    Values are unchanged; parts keep the original's ``requires_grad``.
    """
    splits = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
    done = 0
    for node in list(gm.graph.nodes):
        t = attr_tensor(gm, node)
        if t is None or not node.users or not all(
                u.target in splits and u.args[0] is node and (u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0))
                % max(t.dim(), 1) == 0 and all(g.target is operator.getitem for g in u.users) for u in node.users):
            continue
        grad = isinstance(t, torch.nn.Parameter) and t.requires_grad
        for split in list(node.users):
            parts = torch.split(t.detach(), split.args[1], dim=0)
            for item in list(split.users):
                new = add_param(gm, f"{node.target.replace('.', '_')}_{item.args[1]}", parts[item.args[1]],
                                item, grad)
                item.replace_all_uses_with(new)
                gm.graph.erase_node(item)
            gm.graph.erase_node(split)
        gm.graph.erase_node(node)
        done += 1
    if done:
        remove_unused_attributes(gm)
        gm.recompile()
    return done


def unpack_split_projections(gm: fx.GraphModule) -> int:
    """Split a linear whose output is only ``split`` along its features into one linear per part.

    GPT-2's ``c_attn`` (``q, k, v = linear(x, W[3E, E]).split(E, dim=2)``) and gated MLPs written
    ``linear(x).chunk(2, -1)``: each ``getitem`` of the split becomes ``linear(x, W_i, b_i)`` with
    the part's row block as its own parameter (same values, ``requires_grad`` kept), so the head and
    channel analyses see separate projections. Returns how many linears were split.
    """
    aten = torch.ops.aten
    splits = (aten.split.Tensor, aten.split_with_sizes.default)
    done = 0
    parts: dict[tuple, str] = {}   # (attribute, lo, hi) -> the part's attribute: a shared weight stays shared
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target is not aten.linear.default or len(lin.users) != 1:
            continue
        split = next(iter(lin.users))
        bias = arg(lin, 2, "bias")
        w, b = attr_tensor(gm, lin.args[1]), attr_tensor(gm, bias)
        out = lin.meta.get("val")
        if w is None or split.target not in splits or split.args[0] is not lin or not isinstance(out, torch.Tensor):
            continue
        if bias is not None and b is None:   # a computed bias (BEiT's cat of q/v biases): left packed
            continue
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if dim % out.dim() != out.dim() - 1 or not all(u.target is operator.getitem for u in split.users):
            continue
        sizes = split.args[1]
        if isinstance(sizes, int):
            sizes = [min(sizes, w.shape[0] - lo) for lo in range(0, w.shape[0], sizes)]
        if not all(isinstance(n, int) for n in sizes) or sum(sizes) != w.shape[0]:
            continue
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        def part(src: fx.Node, t: torch.Tensor, i: int, lo: int, hi: int, before: fx.Node) -> fx.Node:
            key = (src.target, lo, hi)
            if key in parts:
                with gm.graph.inserting_before(before):
                    return gm.graph.get_attr(parts[key])
            new = add_param(gm, f"{str(src.target).replace('.', '_')}_{i}", t.detach()[lo:hi], before,
                            isinstance(t, torch.nn.Parameter) and t.requires_grad)
            parts[key] = new.target
            return new
        for item in list(split.users):
            i = item.args[1]
            lo, hi = starts[i], starts[i] + sizes[i]
            wi = part(lin.args[1], w, i, lo, hi, item)
            bi = part(bias, b, i, lo, hi, item) if b is not None else None
            with gm.graph.inserting_before(item):
                li = gm.graph.call_function(aten.linear.default, (lin.args[0], wi, bi))
            copy_meta(li, lin)
            item.replace_all_uses_with(li)
            gm.graph.erase_node(item)
        gm.graph.erase_node(split)
        gm.graph.erase_node(lin)
        done += 1
    if done:
        remove_unused_attributes(gm)
        gm.recompile()
    return done


def unpack_packed_projections(gm: fx.GraphModule) -> int:
    """Split a packed Q/K/V projection into one linear per part; returns how many were split.

    Matches ``linear(x, W[P*E, E]) -> view [..., N, P, H, D] -> permute [2, 0, 3, 1, 4] ->
    select(0, i)`` (torchvision's Swin: ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``)
    and rewrites each ``select`` as ``linear(x, W_i) -> view [..., N, H, D] -> transpose(1, 2)``
    with ``W_i`` the i-th row block of ``W`` as its own parameter: the same values, in the
    separate-projection form the head analysis understands.
    """
    aten = torch.ops.aten
    done = 0
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target is not aten.linear.default or len(lin.users) != 1:
            continue
        view = next(iter(lin.users))
        bias = arg(lin, 2, "bias")
        w, b = attr_tensor(gm, lin.args[1]), attr_tensor(gm, bias)
        if w is None or view.target not in (aten.view.default, aten.reshape.default) or len(view.users) != 1:
            continue
        if bias is not None and b is None:   # a computed bias (BEiT's cat of q/v biases): left packed
            continue
        sizes = list(view.args[1])
        perm = next(iter(view.users))
        if len(sizes) != 5 or not isinstance(sizes[2], int) or perm.target is not aten.permute.default or \
                list(perm.args[1]) != [2, 0, 3, 1, 4] or \
                not all(u.target is aten.select.int and u.args[1] == 0 for u in perm.users):
            continue
        parts = sizes[2]
        if w.shape[0] % parts:
            continue
        rows = w.shape[0] // parts
        grad = isinstance(w, torch.nn.Parameter) and w.requires_grad
        for sel in list(perm.users):
            i = sel.args[2]
            wi = add_param(gm, f"{lin.args[1].target.replace('.', '_')}_{i}", w.detach()[i * rows:(i + 1) * rows],
                           sel, grad)
            bi = add_param(gm, f"{bias.target.replace('.', '_')}_{i}", b.detach()[i * rows:(i + 1) * rows],
                           sel, isinstance(b, torch.nn.Parameter) and b.requires_grad) if b is not None else None
            with gm.graph.inserting_before(sel):
                li = gm.graph.call_function(aten.linear.default, (lin.args[0], wi, bi))
                vi = gm.graph.call_function(aten.view.default, (li, sizes[:2] + sizes[3:]))
                ti = gm.graph.call_function(aten.transpose.int, (vi, 1, 2))
            for new in (li, vi, ti):
                copy_meta(new, lin)
                new.meta.pop("val", None)
            sel.replace_all_uses_with(ti)
        for n in (*perm.users, perm, view, lin):
            if not n.users:
                gm.graph.erase_node(n)
        done += 1
    if done:
        remove_unused_attributes(gm)
        gm.recompile()
    return done

"""Helpers shared by rewrite passes: new parameters, node arguments, removing dead weights."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .dialect import arg, get_attr_tensor, is_impure
from .graph_utils import remove_unused_attributes

__all__ = ["add_param", "attr_tensor", "arg", "erase_dead", "copy_meta", "unpack_split_params"]


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None when ``node`` is something else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = get_attr_tensor(gm, node)
        return t if isinstance(t, torch.Tensor) else None
    return None


def add_param(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node,
              requires_grad: bool = True) -> fx.Node:
    """Register ``value`` as a new root parameter named after ``base`` and return a get_attr for it."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    value = value.detach().contiguous()
    if value.is_floating_point():
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

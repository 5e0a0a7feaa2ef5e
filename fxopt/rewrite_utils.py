"""Helpers shared by rewrite passes: new parameters, node arguments, removing dead weights."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .dialect import arg, get_attr_tensor, is_impure
from .graph_utils import remove_unused_attributes

__all__ = ["add_param", "attr_tensor", "arg", "erase_dead", "copy_meta"]


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

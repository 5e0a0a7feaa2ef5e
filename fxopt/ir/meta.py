"""Fake-tensor metadata for nodes that passes create.

Captured graphs carry ``node.meta["val"]`` (a FakeTensor, possibly with
symbolic sizes). A pass that adds nodes calls :func:`propagate_meta` to fill in
``val`` for them, in the graph's own fake mode, so shapes stay symbolic.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

__all__ = ["fake_mode_of", "fake_values", "propagate_meta", "same_shape", "size_expr"]


def fake_mode_of(gm: fx.GraphModule) -> Any:
    mode = None
    for n in gm.graph.nodes:  # the inputs' fake mode is the graph's (it owns the size symbols)
        val = n.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            mode = val.fake_mode
            if n.op == "placeholder":
                break
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def fake_values(gm: fx.GraphModule, nodes: list[fx.Node] | None = None) -> dict[fx.Node, Any]:
    """The fake value of every node, computing (without storing) those whose ``meta["val"]`` is
    missing (only those in ``nodes`` when given). Analyses use this: they never write the graph.
    Nodes whose op cannot run on fake tensors are absent from the result."""
    todo = set(nodes if nodes is not None else [n for n in gm.graph.nodes if "val" not in n.meta])
    vals: dict[fx.Node, Any] = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta and n not in todo}
    if not todo:
        return vals
    mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node not in todo or node.op in ("output", "placeholder"):
            continue
        try:
            if node.op == "get_attr":
                from fxopt.ir.dialect import get_attr_tensor
                obj = get_attr_tensor(gm, node)
                if isinstance(obj, torch.Tensor):
                    vals[node] = mode.from_tensor(obj, static_shapes=True)
                continue
            if node.op != "call_function":
                continue

            def val(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    if a not in vals:
                        raise KeyError(a.name)
                    return vals[a]
                return a
            args = pytree.tree_map(val, node.args)
            kwargs = pytree.tree_map(val, node.kwargs)
            # like capture: sizes of 1 in symbolic dims must not specialize the symbol
            with mode, torch.fx.experimental._config.patch(backed_size_oblivious=True):
                vals[node] = node.target(*args, **kwargs)
        except Exception:  # unknown meta stays unknown; analyses say so
            continue
    return vals


def propagate_meta(gm: fx.GraphModule, nodes: list[fx.Node] | None = None) -> int:
    """Fill ``meta["val"]`` for nodes that lack it (all such nodes when ``nodes`` is None).

    Returns how many nodes got metadata. Nodes whose op cannot run on fake
    tensors are left without it (analyses then report their shape as unknown).
    """
    todo = nodes if nodes is not None else [n for n in gm.graph.nodes if "val" not in n.meta]
    if not todo:
        return 0
    vals = fake_values(gm, todo)
    filled = 0
    for node in todo:
        if node in vals and node.op not in ("output", "placeholder"):
            node.meta["val"] = vals[node]
            filled += 1
    return filled


def size_expr(s: Any) -> Any:
    """An int for a static size, a sympy expression for a symbolic one."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return int(s)


def same_shape(a: Any, b: Any) -> bool:
    """Whether two FakeTensors provably have the same shape (symbolic sizes compared as expressions)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != b.dim():
        return False
    return all(size_expr(x) == size_expr(y) for x, y in zip(a.shape, b.shape))


def input_symbols(gm: fx.GraphModule) -> dict[str, str]:
    """Map each size symbol to where it comes from: ``{'s77': 'x.shape[0]'}``."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        for i, s in enumerate(n.meta["val"].shape):
            e = size_expr(s)
            if not isinstance(e, int) and e.is_Symbol:
                out.setdefault(str(e), f"{n.name}.shape[{i}]")
    return out

"""``shapes``: output shape and dtype of every node, symbolic where dynamic."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis
from fxopt.ir.meta import fake_values, size_expr

__all__ = ["TensorInfo", "ShapeAnalysis"]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple          # ints and sympy expressions
    dtype: torch.dtype
    requires_grad: bool = False

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(str(s) for s in self.shape)}]"


def _info(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return TensorInfo(tuple(size_expr(s) for s in val.shape), val.dtype)
    if isinstance(val, (tuple, list)):
        return tuple(_info(v) for v in val)
    if isinstance(val, torch.SymInt):
        return size_expr(val)
    return None


@register_analysis
class ShapeAnalysis(Analysis):
    """Per node name: a ``TensorInfo`` (or a tuple of them, or an int/sympy size, or None).

    Nodes a pass created without metadata are computed by fake-tensor propagation (the
    graph is not written: an analysis never mutates it).
    """

    name = "shapes"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> dict[str, Any]:
        vals = fake_values(gm)
        return {n.name: _info(vals.get(n)) for n in gm.graph.nodes}

    def same(self, cached: dict, fresh: dict, gm: fx.GraphModule) -> bool:
        # entries of removed nodes may linger in the cache; every live node must agree
        return all(cached.get(k, "missing") == v for k, v in fresh.items())

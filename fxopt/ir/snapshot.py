"""``GraphSnapshot``: a light, immutable picture of a graph for history, summary, diff and rendering.

Snapshots hold plain strings and numbers only (no tensors, no fx objects), so the
history of a run stays valid after the graph changes and costs little memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import module_path, op_family, op_name

__all__ = ["NodeInfo", "GraphSnapshot", "snapshot_of"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str                # fx opcode: placeholder, get_attr, call_function, call_module, output
    target: str            # full target, e.g. aten.conv2d.default
    inputs: tuple          # names of input nodes
    shape: str             # "s77x64x56x56", "scalar", or "" when unknown / not a tensor
    dtype: str
    module: str            # dotted module path
    created_by: str        # "capture" or the pass that created the node
    opname: str = ""       # short op name: conv2d, linear, getitem
    family: str = "other"  # see fxopt.ir.dialect.op_family
    flops: Any = 0         # int or sympy expression (as str when symbolic)
    bytes: Any = 0
    params: int = 0


@dataclass(frozen=True)
class GraphSnapshot:
    nodes: tuple
    code: str

    @staticmethod
    def of(gm: fx.GraphModule, costs: dict | None = None) -> "GraphSnapshot":
        return snapshot_of(gm, costs)

    def __len__(self) -> int:
        return len(self.nodes)

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def _count(v: Any) -> Any:
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def snapshot_of(gm: fx.GraphModule, costs: dict | None = None) -> GraphSnapshot:
    """Snapshot ``gm``. Per-node FLOPs/bytes come from ``costs`` (node name -> an object with
    ``flops`` and ``bytes``: the cost analysis's ``per_node``) when given."""
    infos = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        shape = dtype = ""
        params = 0
        if isinstance(val, torch.Tensor):
            shape = "x".join(str(s) for s in val.shape) or "scalar"
            dtype = str(val.dtype).replace("torch.", "")
            if n.op == "get_attr":
                params = int(val.numel())
        cost = costs.get(n.name) if costs else None
        flops = nbytes = 0
        if cost is not None:
            flops, nbytes = _count(cost.flops), _count(cost.bytes)
        infos.append(NodeInfo(n.name, n.op, _target_str(n), tuple(a.name for a in n.all_input_nodes),
                              shape, dtype, module_path(n), n.meta.get("fxopt_created_by", "capture"),
                              op_name(n), op_family(n), flops, nbytes, params))
    return GraphSnapshot(tuple(infos), gm.code)


def _target_str(n: fx.Node) -> str:
    if n.op == "call_function":
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            return str(t)
        return getattr(t, "__name__", str(t))
    return str(n.target)

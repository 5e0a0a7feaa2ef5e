"""``cost``: parameters, bytes, FLOPs and MACs per node and in total.

Sizes that are symbolic (dynamic batch or sequence) make the counts sympy
expressions of those symbols; ``CostResult.at(s77=8)`` substitutes values.

Conventions: a multiply-accumulate is 2 FLOPs; pointwise ops cost one FLOP per
output element; reductions one per input element; views, reshapes and
indexing cost 0 FLOPs and 0 bytes. ``bytes`` estimates memory traffic: the
bytes of the tensors an op reads plus those it writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis
from fxopt.ir.dialect import CONV_OPS, aten, get_attr_tensor, is_view_target
from fxopt.ir.meta import fake_values, size_expr

__all__ = ["NodeCost", "CostResult", "CostAnalysis", "node_cost"]


@dataclass(frozen=True)
class NodeCost:
    flops: Any = 0
    macs: Any = 0
    bytes: Any = 0
    params: int = 0


@dataclass
class CostResult:
    per_node: dict = field(default_factory=dict)
    total_flops: Any = 0
    total_macs: Any = 0
    total_bytes: Any = 0
    total_params: int = 0
    param_bytes: int = 0
    symbols: dict = field(default_factory=dict)

    def at(self, **sizes: int) -> dict:
        """Totals with symbols replaced by numbers: ``cost.at(s77=8)``."""
        subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}

        def ev(e: Any) -> Any:
            if isinstance(e, sympy.Expr):
                e = e.xreplace({s: subs.get(sympy.Symbol(s.name, integer=True, positive=True), s)
                                for s in e.free_symbols})
                return int(e) if e.is_number else e
            return e
        return {"flops": ev(self.total_flops), "macs": ev(self.total_macs), "bytes": ev(self.total_bytes),
                "params": self.total_params}


def _numel(val: Any) -> Any:
    if not isinstance(val, torch.Tensor):
        return 0
    n: Any = 1
    for s in val.shape:
        n = n * size_expr(s)
    return n


def _nbytes(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return _numel(val) * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum((_nbytes(v) for v in val), 0)
    return 0


def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _val_of(vals: dict | None) -> Any:
    if vals is None:
        return _val
    return lambda a: vals.get(a) if isinstance(a, fx.Node) else None


_LINEAR = {aten.linear.default}
_MM = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default, aten.baddbmm.default}
_CONV_T = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_NORM = {aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
         aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default,
         aten.native_batch_norm.default, aten._native_batch_norm_legit.default}
_FXOPT_LINEAR = {"fxopt::linear_int8", "fxopt::linear_int8_dynamic", "fxopt::linear_wq"}
_FXOPT_CONV = {"fxopt::conv2d_int8", "fxopt::conv2d_wq"}
_FXOPT_SPARSE = {"fxopt::linear_csr"}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}


def node_cost(node: fx.Node, vals: dict | None = None) -> NodeCost:
    """Cost of one ``call_function`` node from the fake values of it and its inputs (``vals``, node ->
    value, as :func:`fxopt.ir.meta.fake_values` returns; default: their ``meta["val"]``)."""
    _val = _val_of(vals)
    t = node.target
    out = _val(node)
    if is_view_target(t) or t in (aten.sym_size.int, aten._assert_tensor_metadata.default):
        return NodeCost()
    in_bytes = sum((_nbytes(_val(a)) for a in node.all_input_nodes), 0)
    nbytes = in_bytes + _nbytes(out)
    macs: Any = 0
    flops: Any = 0
    qname = t.name() if isinstance(t, torch._ops.OpOverload) and t.namespace == "fxopt" else ""
    if qname in _FXOPT_LINEAR:  # integer kernels do the same multiply-accumulates as float ones
        x = _val(node.args[0])
        macs = _numel(out) * (size_expr(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0)
        flops = 2 * macs
    elif qname in _FXOPT_SPARSE:  # one multiply-accumulate per stored non-zero and row of the input
        x, values = _val(node.args[0]), _val(node.args[3])
        if isinstance(x, torch.Tensor) and isinstance(values, torch.Tensor):
            rows = _numel(x) // size_expr(x.shape[-1]) if x.dim() else 1
            macs = rows * _numel(values)
            flops = 2 * macs
    elif qname in _FXOPT_CONV:
        w = _val(node.args[1])
        if isinstance(w, torch.Tensor):
            macs = _numel(out) * math.prod(int(size_expr(s)) for s in w.shape[1:])
            flops = 2 * macs
    elif t in _LINEAR or t in _MM:
        a = _val(node.args[0] if t not in (aten.addmm.default, aten.baddbmm.default) else node.args[1])
        k = size_expr(a.shape[-1]) if isinstance(a, torch.Tensor) and a.dim() else 0
        macs = _numel(out) * k
        flops = 2 * macs
    elif t in CONV_OPS or t in _CONV_T:
        # weight is [C_out, C_in/groups, *k] (or [C_in, C_out/groups, *k] transposed), so
        # each output (input, when transposed) element costs prod(weight.shape[1:]) MACs
        w = _val(node.args[1])
        transposed = t in _CONV_T or (t is aten.convolution.default and bool(node.args[6]))
        if isinstance(w, torch.Tensor):
            per = math.prod(int(size_expr(s)) for s in w.shape[1:])
            macs = _numel(_val(node.args[0]) if transposed else out) * per
            flops = 2 * macs
    elif t is aten.scaled_dot_product_attention.default:
        q, k = _val(node.args[0]), _val(node.args[1])
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            s_len = size_expr(k.shape[-2])
            macs = _numel(q) * s_len + _numel(out) * s_len           # Q K^T and P V
            e = size_expr(q.shape[-1])
            rows = _numel(q) // e if isinstance(_numel(q), int) and isinstance(e, int) else _numel(q) / e
            flops = 2 * macs + 5 * rows * s_len                     # plus scale and softmax
    elif t in _NORM:
        x = _val(node.args[0])
        flops = 5 * _numel(x)
    elif t in _SOFTMAX:
        flops = 5 * _numel(out)
    elif isinstance(t, torch._ops.OpOverload) and torch.Tag.reduction in t.tags:
        flops = sum((_numel(_val(a)) for a in node.all_input_nodes), 0)
    elif isinstance(out, torch.Tensor):
        flops = _numel(out)
    return NodeCost(flops=flops, macs=macs, bytes=nbytes)


def _sig(v: Any) -> Any:
    """What a node's cost depends on in a value: a tensor's shape and dtype, else the value's text."""
    if isinstance(v, torch.Tensor):
        return (tuple(str(d) for d in v.shape), str(v.dtype))
    if isinstance(v, (list, tuple)):
        return tuple(_sig(x) for x in v)
    return str(v)


def _freeze(a: Any, val: Any = _val) -> Any:
    if isinstance(a, fx.Node):
        return ("%", _sig(val(a)))
    if isinstance(a, torch.Tensor):  # a constant argument: by shape and dtype (its repr could be huge)
        return _sig(a)
    if isinstance(a, (list, tuple)):
        return tuple(_freeze(x, val) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _freeze(v, val)) for k, v in a.items()))
    return repr(a)


def _key(node: fx.Node, vals: dict | None = None) -> tuple:
    """The cost cache key: the op, every argument and keyword (inputs by shape and dtype) and the
    output's shape. Value-based, so a pass that edits a node in place (a new target, ``approximate=``,
    new shapes) never reads a stale cost, and no pass has to clear the cache by hand."""
    val = _val_of(vals)
    return (node.target, _freeze(node.args, val), _freeze(node.kwargs, val), _sig(val(node)))


#: node costs by value key (op, arguments by shape and dtype, output shape): a pure function's cache,
#: kept here, not in the graph (an analysis never writes the graph)
_COSTS: dict[tuple, NodeCost] = {}
_MAX_COSTS = 200_000


@register_analysis
class CostAnalysis(Analysis):
    """Per node name: ``NodeCost``; totals as ints or sympy expressions."""

    name = "cost"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> CostResult:
        from fxopt.ir.meta import input_symbols
        vals = fake_values(gm)   # computed, not written: nodes a pass left without metadata
        res = CostResult(symbols=input_symbols(gm))
        flops, macs, nbytes = [], [], []
        seen: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                val = vals.get(node)
                if not isinstance(val, torch.Tensor):  # a non-tensor attribute, or meta that failed
                    val = get_attr_tensor(gm, node)
                n = int(_numel(val)) if isinstance(val, torch.Tensor) else 0
                if str(node.target) not in seen:
                    seen.add(str(node.target))
                    res.total_params += n
                    res.param_bytes += int(_nbytes(val)) if isinstance(val, torch.Tensor) else 0
                res.per_node[node.name] = NodeCost(params=n)
                continue
            if node.op != "call_function":
                continue
            try:
                key = _key(node, vals)
                c = _COSTS.get(key)
            except TypeError:   # an unhashable argument: no caching for this node
                key, c = None, None
            if c is None:
                try:
                    c = node_cost(node, vals)
                except Exception:  # unknown shapes: count nothing rather than fail
                    c = NodeCost()
                if key is not None:
                    if len(_COSTS) >= _MAX_COSTS:
                        _COSTS.clear()
                    _COSTS[key] = c
            res.per_node[node.name] = c
            flops.append(c.flops)
            macs.append(c.macs)
            nbytes.append(c.bytes)
        res.total_flops = _sum(flops)
        res.total_macs = _sum(macs)
        res.total_bytes = _sum(nbytes)
        return res

    def same(self, cached: CostResult, fresh: CostResult, gm: fx.GraphModule) -> bool:
        return all(cached.per_node.get(k) == v for k, v in fresh.per_node.items())


def _sum(values: list) -> Any:
    ints = sum(v for v in values if isinstance(v, int))
    exprs = [v for v in values if not isinstance(v, int)]
    if not exprs:
        return ints
    total = sympy.Add(*exprs) + ints
    total = sympy.expand(total)
    return int(total) if total.is_number else total

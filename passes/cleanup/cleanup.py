"""Cleanup passes: ``dce``, ``cse``, ``fold-constants``, ``remove-noops`` and the ``cleanup`` pipeline.

All four are exact: they never change what the model computes (the manager
checks outputs against the previous graph with zero tolerance for
``remove-noops``, ``cse`` and ``dce``). Each preserves the ``shapes`` and
``provenance`` analyses of the nodes it keeps, except ``fold-constants``,
which creates nodes. ``cleanup`` runs them to a fixed point.

Example::

    >>> import torch, fxopt
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return (x * 1 + 0).relu()
    >>> out = fxopt.compile(M(), (torch.randn(2, 3),), recipe="cleanup")
    >>> [n.name for n in out.graph.nodes if n.op == "call_function"]
    ['relu']
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, get_attr_tensor, is_impure, is_view_target, written_attrs
from fxopt.ir.graph_utils import remove_unused_attributes
from fxopt.ir.meta import propagate_meta, same_shape
from fxopt.passmgr.pass_base import EXACT, Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.passmgr.pipeline import register_pipeline

__all__ = ["DeadCodeEliminationPass", "CommonSubexpressionEliminationPass", "FoldConstantsPass",
           "RemoveNoopsPass"]

_KEEPS = frozenset({"shapes", "provenance"})


@register_pass
class DeadCodeEliminationPass(Pass):
    """Remove nodes whose results nobody uses, and the parameters only they read.

    Keeps placeholders, the output, asserts, random ops, in-place ops and the
    export shape guard. Preserves ``shapes`` and ``provenance``. Exact.
    """

    name = "dce"
    tolerance = EXACT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and not is_impure(node):
                gm.graph.erase_node(node)
                removed += 1
        attrs = remove_unused_attributes(gm) if removed else 0
        return PassResult(bool(removed), _KEEPS, {"nodes_removed": removed, "attributes_removed": attrs})


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, float):
        return ("float", v, str(v))  # 0.0 and -0.0 differ; nan never equals itself
    if isinstance(v, slice):
        return ("slice", _freeze(v.start), _freeze(v.stop), _freeze(v.step))
    hash(v)
    return (type(v).__name__, v) if isinstance(v, (bool, int)) else v


@register_pass
class CommonSubexpressionEliminationPass(Pass):
    """Merge nodes that compute the same op on the same inputs (and duplicate ``get_attr`` reads).

    Random, mutating and assert ops are never merged. Preserves ``shapes`` and
    ``provenance``. Exact.
    """

    name = "cse"
    tolerance = EXACT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        seen: dict[Any, fx.Node] = {}
        merged = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
            elif node.op == "call_function" and not is_impure(node):
                try:
                    key = (node.target, _freeze(node.args), _freeze(node.kwargs))
                    hash(key)
                except TypeError:
                    continue
            else:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
        return PassResult(bool(merged), _KEEPS, {"merged": merged})


@register_pass
class FoldConstantsPass(Pass):
    """Evaluate subgraphs that depend only on parameters and constants, once, at compile time.

    The result is stored as a buffer (``_folded_<node>``) read by a ``get_attr``.
    Pure view chains are left alone (they are free at run time), and so are
    results much larger than their inputs (an ``expand`` would be materialized).
    Buffers the model writes in ``forward`` (step counters, running statistics) are
    state, not constants. fxopt's own ops (``dequantize`` of stored weight codes, the
    kernels) stay: they are the quantized form that lowering and ONNX export match, and
    a folded float weight between quantized activations is one ONNX Runtime would
    re-quantize on its own terms.
    Leaves the now-dead subgraph to ``dce``. Exact up to the same kernels
    running eagerly.
    """

    name = "fold-constants"
    tolerance = Tolerance(atol=1e-6, rtol=1e-6)
    #: do not materialize results larger than this many times their inputs
    max_growth = 2
    #: a folded result may add this many bytes beyond what it frees
    slack_bytes = 4096

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        const: set[fx.Node] = set()
        has_compute: dict[fx.Node, bool] = {}
        state = written_attrs(gm)  # buffers the model updates in forward are not constants
        for node in gm.graph.nodes:
            if node.op == "get_attr" and str(node.target) not in state:
                const.add(node)
                has_compute[node] = False
            elif (node.op == "call_function" and not is_impure(node) and node.target is not aten.sym_size.int
                  and getattr(node.target, "namespace", None) != "fxopt"):
                inputs = node.all_input_nodes
                if all(a in const for a in inputs) and inputs:
                    const.add(node)
                    has_compute[node] = any(has_compute[a] for a in inputs) or not is_view_target(node.target)
        # fold where constant compute meets the rest of the graph; views of a folded value stay
        # views (they are free), so a node consumed only through views is folded itself
        frontier = [n for n in const if n.op == "call_function" and has_compute[n]
                    and not is_view_target(n.target)
                    and any(u not in const or is_view_target(u.target) for u in n.users)]
        if not frontier:
            return PassResult(False)
        env: dict[fx.Node, Any] = {}
        folded = 0
        for node in gm.graph.nodes:  # topological order
            if node not in const:
                continue
            if node.op == "get_attr":
                env[node] = get_attr_tensor(gm, node)
                continue
            args = torch.fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
            with torch.no_grad():
                env[node] = node.target(*args, **kwargs)
        for node in frontier:
            value = env[node]
            if not isinstance(value, torch.Tensor):
                continue
            in_numel = sum(env[a].numel() for a in _leaf_inputs(node, const)
                           if isinstance(env[a], torch.Tensor))
            if value.numel() > self.max_growth * max(in_numel, 1) and value.numel() > 1024:
                continue
            # never grow the model: the folded tensor must fit in what it frees (plus a little)
            freed = sum(_nbytes(env[a]) for a in _leaf_inputs(node, const)
                        if all(u in const for u in a.users))
            if _nbytes(value) > freed + self.slack_bytes:
                continue
            name = _free_attr_name(gm, f"_folded_{node.name}")
            gm.register_buffer(name, value.detach().clone().contiguous())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(name)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(new)
            folded += 1
        if folded:
            propagate_meta(gm)
        return PassResult(bool(folded), frozenset(), {"folded": folded})


def _leaf_inputs(node: fx.Node, const: set) -> set:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            out.add(n)
        stack.extend(a for a in n.all_input_nodes if a in const)
    return out


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _free_attr_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


# ----------------------------------------------------------------- no-ops
def _is_scalar(v: Any, value: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == value


def _identity_input(node: fx.Node) -> Any:
    """The input that ``node`` merely passes through, or None."""
    t, a = node.target, node.args
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        if _is_scalar(a[1], 1):
            return a[0]
        if _is_scalar(a[0], 1) and isinstance(a[1], fx.Node):
            return a[1]
    if t in (aten.div.Tensor, aten.div.Scalar) and _is_scalar(a[1], 1) and "rounding_mode" not in node.kwargs:
        return a[0]
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        if _is_scalar(a[1], 0):
            return a[0]
        if t in (aten.add.Tensor, aten.add.Scalar) and _is_scalar(a[0], 0) and isinstance(a[1], fx.Node):
            return a[1]
    if t is aten.pow.Tensor_Scalar and _is_scalar(a[1], 1):
        return a[0]
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
             aten.alias.default, aten.expand_as.default, aten.type_as.default, aten.view_as.default,
             aten.reshape_as.default):
        return a[0]
    if t is aten.slice.Tensor:
        step = a[4] if len(a) > 4 else node.kwargs.get("step", 1)
        return a[0] if step == 1 else None
    if t is aten.permute.default and list(a[1]) == list(range(len(a[1]))):
        return a[0]
    if t is aten.transpose.int and isinstance(a[0], fx.Node) and isinstance(a[0].meta.get("val"), torch.Tensor):
        nd = a[0].meta["val"].dim()
        if nd and a[1] % nd == a[2] % nd:
            return a[0]
    if t in (aten.dropout.default, aten.native_dropout.default) and len(a) > 2 and a[2] is False:
        return a[0] if t is aten.dropout.default else None
    if t in (aten.clone.default, aten._to_copy.default, aten.contiguous.default):
        src = a[0]
        # a copy of a model input or weight protects it from callers that mutate outputs
        if isinstance(src, fx.Node) and src.op in ("placeholder", "get_attr"):
            return None
        kw = node.kwargs
        if t is aten._to_copy.default and (kw.get("non_blocking") or kw.get("pin_memory")):
            return None
        fmt = kw.get("memory_format")
        if fmt not in (None, torch.preserve_format, torch.contiguous_format):
            return None
        if fmt is torch.contiguous_format or t is aten.contiguous.default:
            val = src.meta.get("val") if isinstance(src, fx.Node) else None
            if not (isinstance(val, torch.Tensor) and _statically_contiguous(val)):
                return None
        return src
    # inverse pairs: t(t(x)), transpose(transpose(x, a, b), a, b), neg(neg(x))
    src = a[0] if a else None
    if isinstance(src, fx.Node) and src.op == "call_function":
        if t is aten.t.default and src.target is aten.t.default:
            return src.args[0]
        if t is aten.neg.default and src.target is aten.neg.default:
            return src.args[0]
        if t is aten.transpose.int and src.target is aten.transpose.int and \
                {a[1], a[2]} == {src.args[1], src.args[2]}:
            return src.args[0]
        if t is aten.permute.default and src.target is aten.permute.default:
            p, q = list(src.args[1]), list(a[1])
            if [p[i] for i in q] == list(range(len(q))):
                return src.args[0]
    return None


def _statically_contiguous(val: torch.Tensor) -> bool:
    try:
        return bool(torch.fx.experimental.symbolic_shapes.statically_known_true(val.is_contiguous()))
    except Exception:
        return False


_IDEMPOTENT = {aten.relu.default, aten.abs.default, aten.ceil.default, aten.floor.default,
               aten.round.default, aten.trunc.default, aten.sign.default}


@register_pass
class RemoveNoopsPass(Pass):
    """Remove ops that change nothing: ``x*1``, ``x+0``, ``x/1``, ``x**1``, same-shape
    ``view``/``reshape``/``expand``/``slice``, identity ``permute``/``transpose``, eval
    ``dropout``, copies and casts to the same dtype/layout of intermediate values,
    ``contiguous`` on contiguous tensors, inverse pairs (``t(t(x))``, double
    transpose/permute, ``neg(neg(x))``), and repeated idempotent ops (``relu(relu(x))``).

    A candidate is removed only when its output provably has the input's shape
    and dtype (symbolic sizes compared as expressions). Preserves ``shapes``
    and ``provenance``. Exact.
    """

    name = "remove-noops"
    tolerance = EXACT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not node.args:
                continue
            if node.target in _IDEMPOTENT and isinstance(node.args[0], fx.Node) and \
                    node.args[0].target is node.target:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
                continue
            src = _identity_input(node)
            if not isinstance(src, fx.Node):
                continue
            out_val, in_val = node.meta.get("val"), src.meta.get("val")
            if not same_shape(out_val, in_val) or out_val.dtype != in_val.dtype or \
                    out_val.device != in_val.device or out_val.layout != in_val.layout:
                continue
            node.replace_all_uses_with(src)
            if not node.users:
                gm.graph.erase_node(node)
            removed += 1
        return PassResult(bool(removed), _KEEPS, {"removed": removed})


register_pipeline("cleanup", "repeat(remove-noops,fold-constants,cse,dce)",
                  "Exact cleanup to a fixed point: no-op removal, constant folding, CSE, dead-code elimination.")

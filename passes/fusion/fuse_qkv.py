"""``fuse-qkv``: merge sibling linears that read the same input into one linear plus a split.

Q/K/V projections (and gate/up projections) each read the same hidden state;
one GEMM with the weights concatenated reads that input once and launches one
kernel. The outputs are ``split_with_sizes`` views of the merged result.

Preconditions: two or more ``linear`` nodes with the same input node, weights
and biases that are parameters of one dtype, all with a bias or all without.
Tolerance: atol/rtol 1e-5 (a wider GEMM may block its sums differently).

Measured (``bench/rewrites.py``, 2-core AVX2 CPU): no faster on MiniLM at 8x128
(1.00x) and 4% slower on a hand-written 256-wide transformer (0.96x), so it is
not in the ``default`` recipe; it is meant for GPUs and for quantized GEMMs
where one wider kernel launch pays.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, is_linear, linear_args
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import add_param, attr_tensor, copy_meta, erase_dead

__all__ = ["FuseSiblingLinearsPass"]


@register_pass
class FuseSiblingLinearsPass(Pass):
    """Merge linears that share an input into one linear and a split (see module docs)."""

    name = "fuse-qkv"
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if is_linear(node):
                x, w, b = linear_args(node)
                if isinstance(x, fx.Node) and attr_tensor(gm, w) is not None and \
                        (b is None or attr_tensor(gm, b) is not None):
                    groups.setdefault(x, []).append(node)
        fused = 0
        # siblings fuse when they agree on dtype, input width and having a bias
        buckets: dict[tuple, list[fx.Node]] = {}
        for x, nodes in groups.items():
            for n in nodes:
                w = attr_tensor(gm, linear_args(n)[1])
                buckets.setdefault((x, w.dtype, int(w.shape[1]), linear_args(n)[2] is None), []).append(n)
        for (x, *_), nodes in buckets.items():
            if len(nodes) < 2:
                continue
            ws = [attr_tensor(gm, linear_args(n)[1]) for n in nodes]
            bs = [linear_args(n)[2] for n in nodes]
            first = nodes[0]
            sizes = [int(w.shape[0]) for w in ws]
            with torch.no_grad():
                w_cat = torch.cat([w.detach() for w in ws], 0)
                b_cat = torch.cat([attr_tensor(gm, b).detach() for b in bs], 0) if bs[0] is not None else None
            grad = any(w.requires_grad for w in ws)
            base = "_".join(n.name.rsplit("_linear", 1)[0] for n in nodes)[:60]
            w_node = add_param(gm, f"{base}_fused_weight", w_cat, first, grad)
            b_node = add_param(gm, f"{base}_fused_bias", b_cat, first, grad) if b_cat is not None else None
            parent = {k: v for k, v in list(first.meta.get("nn_module_stack", {}).items())[:-1]}
            with gm.graph.inserting_before(first):
                merged = gm.graph.call_function(aten.linear.default, (x, w_node, b_node))
                parts = gm.graph.call_function(aten.split_with_sizes.default, (merged, sizes, -1))
                outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
            for n in (merged, parts, *outs, w_node) + ((b_node,) if b_node is not None else ()):
                copy_meta(n, first)
                if parent:
                    n.meta["nn_module_stack"] = parent
            for node, out in zip(nodes, outs):
                node.replace_all_uses_with(out)
                gm.graph.erase_node(node)
            fused += 1
        if fused:
            erase_dead(gm)
            propagate_meta(gm)
        return PassResult(bool(fused), frozenset(), {"groups_fused": fused})

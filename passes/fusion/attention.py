"""``fuse-attention``: hand-written attention becomes ``scaled_dot_product_attention``.

Matches ``softmax(q @ k.transpose(-2, -1) * scale [+ mask], -1) @ v`` (the scale as a
multiplication or a division by a constant, or absent) and replaces it with
``sdpa(q, k, v, attn_mask=mask, scale=scale)``, which never materializes the
``L x S`` score matrix in a fused kernel. The probabilities must have no other
user. Tolerance: atol/rtol 1e-4 (a different softmax/GEMM order).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.dialect import SOFTMAX_OPS, aten
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import copy_meta, erase_dead

__all__ = ["FuseAttentionPass"]

_MATMUL = {aten.matmul.default, aten.bmm.default}


def _last_two_swapped(node: object) -> fx.Node | None:
    """k when node is k.transpose(-2, -1) (any spelling of the last two dims)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    k = node.args[0]
    val = k.meta.get("val") if isinstance(k, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    nd = val.dim()
    if node.target is aten.transpose.int and {node.args[1] % nd, node.args[2] % nd} == {nd - 2, nd - 1}:
        return k
    if node.target is aten.permute.default:
        perm = [p % nd for p in node.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return k
    return None


@register_pass
class FuseAttentionPass(Pass):
    """Replace matmul-scale-mask-softmax-matmul attention by SDPA (see module docs)."""

    name = "fuse-attention"
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fused = 0
        for sm in list(gm.graph.nodes):
            if sm.op != "call_function" or sm.target not in SOFTMAX_OPS:
                continue
            val = sm.meta.get("val")
            if not isinstance(val, torch.Tensor) or sm.args[1] % val.dim() != val.dim() - 1:
                continue
            if sm.target is aten._softmax.default and sm.args[2]:
                continue
            if sm.target is aten.softmax.int and (len(sm.args) > 2 and sm.args[2] is not None or sm.kwargs):
                continue
            if len(sm.users) != 1:
                continue
            out = next(iter(sm.users))
            if out.target not in _MATMUL or out.args[0] is not sm:
                continue
            v = out.args[1]
            s = sm.args[0]
            mask = None
            if isinstance(s, fx.Node) and s.target is aten.add.Tensor and len(s.users) == 1 and not s.kwargs:
                a, b = s.args
                if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                    # the scores are the side that comes from the q @ k^T chain
                    s, mask = (a, b) if _scores(a) else (b, a) if _scores(b) else (None, None)
                    if s is None:
                        continue
            scale = 1.0
            if isinstance(s, fx.Node) and len(s.users) == 1 and s.target in (aten.mul.Tensor, aten.div.Tensor) \
                    and isinstance(s.args[1], (int, float)) and not isinstance(s.args[1], bool):
                scale = float(s.args[1]) if s.target is aten.mul.Tensor else 1.0 / float(s.args[1])
                s = s.args[0]
            if not isinstance(s, fx.Node) or s.target not in _MATMUL or len(s.users) != 1:
                continue
            q, kt = s.args
            k = _last_two_swapped(kt)
            if k is None or not all(isinstance(t, fx.Node) and isinstance(t.meta.get("val"), torch.Tensor)
                                    for t in (q, k, v)):
                continue
            qv, kv, vv = q.meta["val"], k.meta["val"], v.meta["val"]
            if not (qv.dim() == kv.dim() == vv.dim() >= 3) or not qv.is_floating_point():
                continue
            with gm.graph.inserting_before(out):
                new = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v),
                                             {"attn_mask": mask, "scale": scale})
            copy_meta(new, out)
            out.replace_all_uses_with(new)
            fused += 1
        if fused:
            erase_dead(gm)
            propagate_meta(gm)
        return PassResult(bool(fused), frozenset(), {"fused": fused})


def _scores(node: fx.Node) -> bool:
    """Whether ``node`` is (a scaling of) a q @ k^T matmul."""
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.target in _MATMUL and _last_two_swapped(node.args[1]) is not None

"""``fold-bn``: fold eval-mode batch norm into the convolution or linear before it.

``y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta`` becomes
``conv(x, W * s) + (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``:
one op instead of three, and the BN parameters disappear.

Preconditions: the BN is the inference form (``_native_batch_norm_legit_no_training``;
train-mode BN is left alone), its statistics and affine parameters are weights
(``get_attr``), the conv/linear output feeds only the BN, and a linear feeds a
BatchNorm1d over its features (2-D output). Transposed convolutions are skipped.
Tolerance: float reassociation, atol 1e-4 / rtol 1e-3 on the model outputs.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxopt.ir.dialect import CONV_OPS, aten, is_linear
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import add_param, arg, attr_tensor, copy_meta, erase_dead

__all__ = ["FoldBatchNormPass"]

_BN = aten._native_batch_norm_legit_no_training.default


@register_pass
class FoldBatchNormPass(Pass):
    """Fold eval-mode batch norm into the preceding conv or linear (see module docs)."""

    name = "fold-bn"
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = 0
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function" or bn.target is not _BN:
                continue
            src = bn.args[0]
            if not isinstance(src, fx.Node) or len(src.users) != 1:
                continue
            if src.target in CONV_OPS:
                if src.target is aten.convolution.default and arg(src, 6, "transposed", False):
                    continue
            elif is_linear(src):
                out = src.meta.get("val")
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    continue
            else:
                continue
            users = list(bn.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                continue
            w = attr_tensor(gm, src.args[1])
            b_node = arg(src, 2, "bias")
            b = attr_tensor(gm, b_node) if b_node is not None else None
            gamma = attr_tensor(gm, bn.args[1]) if bn.args[1] is not None else None
            beta = attr_tensor(gm, bn.args[2]) if bn.args[2] is not None else None
            mean, var = attr_tensor(gm, bn.args[3]), attr_tensor(gm, bn.args[4])
            eps = float(bn.args[6])
            if w is None or mean is None or var is None or (b_node is not None and b is None) or \
                    (bn.args[1] is not None and gamma is None) or (bn.args[2] is not None and beta is None):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(var.double() + eps)
                if gamma is not None:
                    scale = scale * gamma.double()
                new_w = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
                bias = b.double() if b is not None else torch.zeros_like(mean, dtype=torch.float64)
                new_b = (bias - mean.double()) * scale
                if beta is not None:
                    new_b = new_b + beta.double()
                new_b = new_b.to(w.dtype)
            base = src.args[1].name
            w_node = add_param(gm, f"{base}_bnfold", new_w, src, w.requires_grad)
            b_new = add_param(gm, f"{base.rsplit('_weight', 1)[0]}_bias_bnfold", new_b, src, w.requires_grad)
            for n in (w_node, b_new):
                copy_meta(n, src)
            args = list(src.args)
            while len(args) < 3:
                args.append(None)
            args[1], args[2] = w_node, b_new
            src.args = tuple(args)
            src.kwargs = {k: v for k, v in src.kwargs.items() if k != "bias"}
            for u in users:
                u.replace_all_uses_with(src)
                gm.graph.erase_node(u)
            gm.graph.erase_node(bn)
            folded += 1
        if folded:
            erase_dead(gm)
            propagate_meta(gm)
        return PassResult(bool(folded), frozenset(), {"folded": folded})

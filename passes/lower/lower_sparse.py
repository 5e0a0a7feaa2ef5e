"""``lower-sparse``: run sparse linears on sparse kernels (CSR on CPU; 2:4 and block-sparse on CUDA).

Which kernel runs a layer is the ``sparse`` part of the rule table of
:mod:`fxopt.passes.lower.rules` (``linear_csr`` on CPU; ``linear_24_gpu`` and ``linear_bsr_gpu``
on CUDA, :mod:`fxopt.passes.lower.rules_cuda`, each kept only where timed faster than the dense
layer on the device); this pass finds the candidate layers and records what each rule did.

A linear whose weight has at most ``max_density`` non-zeros (after ``magnitude-prune`` and
fine-tuning, say) becomes ``torch.ops.fxopt.linear_csr``: the weight is stored as CSR
arrays (bytes fall to about ``2 * density`` of the dense weight: int32 column index plus
fp32 value per non-zero) and multiplied with ``torch.sparse.mm``. On this 2-core CPU the
CSR product beats the dense one only from about 90% zeros (``bench/prune.py --section d``),
hence the default ``max_density=0.1``; denser layers are left dense. Exact up to float
summation order (tolerance 1e-5 abs / 1e-4 rel). Pruning masks of lowered layers are
dropped: fine-tune before lowering.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxopt.ir.dialect import aten, module_path
from fxopt.errors import PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.passes.lower import rules, rules_cuda
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import erase_dead

__all__ = ["LowerSparsePass"]


@register_pass
class LowerSparsePass(Pass):
    """Linears with at most ``max_density`` non-zero weights become sparse matmuls (the ``sparse`` rules)."""

    name = "lower-sparse"
    tolerance = Tolerance(atol=1e-5, rtol=1e-4)

    @dataclass(frozen=True)
    class Config:
        # (the 2:4 rule takes any 2:4 weight; max_density bounds the CSR and block-sparse rules)
        max_density: float = 0.1
        # the device whose rules apply: auto (the graph's), cpu or cuda (lower for a GPU from any machine)
        target: str = "auto"
        # CUDA: "auto"/"slower" time each layer's sparse kernels against its dense form and keep the faster
        # per row bucket; "never" takes the kernel without timing
        decline: str = "auto"

        def __post_init__(self) -> None:
            if not 0 < self.max_density <= 1:
                raise PipelineError(f"lower-sparse: max_density must be in (0, 1], got {self.max_density}")
            if self.target not in ("auto", "cpu", "cuda"):
                raise PipelineError(f"lower-sparse(target=...) is auto (the graph's device), cpu or cuda; got {self.target!r}")
            if self.decline not in ("auto", "slower", "never"):
                raise PipelineError(f"lower-sparse(decline=...) is auto, slower or never; got {self.decline!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        done, dense = {}, []
        device = rules.graph_device(gm, ctx.args) if self.config.target == "auto" else self.config.target
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            m = rules.match_sparse(gm, node, self.config)
            if m is None:
                continue
            name = module_path(node) or node.name
            found = rules.first_rule(gm, node, "sparse", device, self.config, known={rules.match_sparse: m})
            kind = found[0].build(found[1], found[0]) if found is not None else ""
            if not kind:
                dense.append(name)
                continue
            done[name] = round(m.density, 4)
        plans = rules_cuda.gpu_plans(gm)
        info = {"dense": dense, **({"gpu_plans": plans} if plans else {})}
        if not done:
            return PassResult(False, info=info)
        erase_dead(gm)
        propagate_meta(gm)
        return PassResult(True, frozenset({"shapes"}), {"lowered": done, "device": device, **info})

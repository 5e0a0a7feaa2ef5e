"""``lower-sparse``: run very sparse linears as CSR sparse matmuls on CPU.

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

import torch
import torch.fx as fx

import fxopt.kernels.cpu_sparse  # noqa: F401  (registers fxopt::linear_csr)
from fxopt.ir.dialect import aten, arg, module_path
from fxopt.errors import PipelineError
from fxopt.kernels.cpu_sparse import to_csr
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["LowerSparsePass"]


@register_pass
class LowerSparsePass(Pass):
    """Linears with at most ``max_density`` non-zero weights become CSR sparse matmuls (CPU)."""

    name = "lower-sparse"
    tolerance = Tolerance(atol=1e-5, rtol=1e-4)

    @dataclass(frozen=True)
    class Config:
        max_density: float = 0.1

        def __post_init__(self) -> None:
            if not 0 < self.max_density <= 1:
                raise PipelineError(f"lower-sparse: max_density must be in (0, 1], got {self.max_density}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        done, dense = {}, []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            w = attr_tensor(gm, node.args[1])
            if w is None or w.dim() != 2 or w.dtype != torch.float32:
                continue
            density = float((w != 0).float().mean())
            name = module_path(node) or node.name
            if density > self.config.max_density:
                dense.append(name)
                continue
            crow, col, values = to_csr(w)
            owner = str(node.args[1].target).rpartition(".")[0]
            mod = gm.get_submodule(owner) if owner else gm
            nodes = []
            for suffix, t in (("crow", crow), ("col", col), ("values", values)):
                attr = f"weight_csr_{suffix}"
                mod.register_buffer(attr, t)
                with gm.graph.inserting_before(node):
                    nodes.append(gm.graph.get_attr(f"{owner}.{attr}" if owner else attr))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.fxopt.linear_csr.default,
                                             (node.args[0], *nodes, int(w.shape[1]), arg(node, 2, "bias")))
            copy_meta(new, node)
            new.meta["fxopt_sparsity"] = {"pattern": "csr", "density": density}
            node.replace_all_uses_with(new)
            old_name = node.name
            gm.graph.erase_node(node)
            new._rename(old_name)
            done[name] = round(density, 4)
        if not done:
            return PassResult(False, info={"dense": dense})
        erase_dead(gm)
        propagate_meta(gm)
        return PassResult(True, frozenset({"shapes"}), {"lowered": done, "dense": dense})

"""Weight sparsity: ``magnitude-prune`` (unstructured) and ``sparsify-2:4`` (semi-structured).

Both zero the smallest-magnitude weights of convolutions and linears and keep the
model's shapes. They record what they did so later stages can use it:

* ``node.meta["fxopt_sparsity"] = {"pattern": "unstructured" | "2:4", "density": float}``
  on each pruned conv/linear node, for lowering to pick sparse kernels;
* a ``<weight>_mask`` buffer next to each pruned weight; ``reapply_masks(model)`` (which
  ``fxopt.finetune`` calls after every step by default) keeps pruned weights at zero
  while fine-tuning.

``sparsify-2:4`` keeps the 2 largest of every 4 consecutive weights along the input
dimension (for a conv, the flattened ``C_in x kh x kw`` GEMM reduction dimension), the
pattern NVIDIA's sparse tensor cores run; layers whose input dimension is not a
multiple of 4 are skipped. ``magnitude-prune`` removes ``ratio`` of the weights per
layer, or globally across layers (``scope=global``). Both skip the output layer
unless ``keep_output=false`` and any module matching ``ignore``. They change numerics
(by design): the manager records the error instead of rejecting it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.dialect import is_conv, is_linear, module_path
from fxopt.errors import PipelineError
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import add_param, attr_tensor, copy_meta, erase_dead
from fxopt.ir.masks import MASK_SUFFIX

__all__ = ["MagnitudePrunePass", "Sparsify24Pass", "mask_24"]



def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest |w| of every 4 along the flattened input dimension."""
    flat = w.detach().reshape(w.shape[0], -1)
    groups = flat.abs().reshape(flat.shape[0], -1, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape)


def _targets(gm: fx.GraphModule, keep_output: bool, ignore: tuple) -> list[fx.Node]:
    nodes = [n for n in gm.graph.nodes if (is_linear(n) or is_conv(n)) and attr_tensor(gm, n.args[1]) is not None]
    if keep_output and nodes:
        # the last weighted layer usually produces the logits: keep it dense
        nodes = nodes[:-1]
    return [n for n in nodes if not any(fnmatch.fnmatch(module_path(n), p) for p in ignore)]


def _apply(gm: fx.GraphModule, node: fx.Node, mask: torch.Tensor, pattern: str) -> float:
    w_node = node.args[1]
    w = attr_tensor(gm, w_node)
    new_w = add_param(gm, f"{w_node.name}_sparse", w.detach() * mask, node, w.requires_grad)
    copy_meta(new_w, w_node)
    gm.register_buffer(f"{new_w.target}{MASK_SUFFIX}", mask.to(w.dtype))
    gm.meta.setdefault("fxopt_keep_attrs", {})[f"{new_w.target}{MASK_SUFFIX}"] = str(new_w.target)
    node.replace_input_with(w_node, new_w)
    density = float(mask.float().mean())
    node.meta["fxopt_sparsity"] = {"pattern": pattern, "density": density}
    return density


@dataclass(frozen=True)
class _Common:
    keep_output: bool = True
    ignore: tuple = ()


@register_pass
class Sparsify24Pass(Pass):
    """2:4 semi-structured sparsity on convs and linears (see module docs)."""

    name = "sparsify-2:4"
    preserves_semantics = False
    compresses = True
    Config = _Common

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        done, skipped = {}, []
        for node in _targets(gm, self.config.keep_output, tuple(self.config.ignore)):
            w = attr_tensor(gm, node.args[1])
            if node.meta.get("fxopt_sparsity") or w[0].numel() % 4:
                skipped.append(module_path(node) or node.name)
                continue
            done[module_path(node) or node.name] = round(_apply(gm, node, mask_24(w), "2:4"), 3)
        if done:
            erase_dead(gm)
        info: dict = {"layers": len(done), "skipped": skipped}
        if not done:
            info["why"] = ("no conv or linear whose rows split into groups of 4" if skipped else
                           "no conv or linear besides the kept output layer")
        return PassResult(bool(done), frozenset({"shapes"}), info)


@register_pass
class MagnitudePrunePass(Pass):
    """Unstructured magnitude pruning, per layer or global (see module docs)."""

    name = "magnitude-prune"
    preserves_semantics = False
    compresses = True

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.5
        scope: str = "layer"
        keep_output: bool = True
        ignore: tuple = ()

        def __post_init__(self) -> None:
            if not 0 <= self.ratio < 1:
                raise PipelineError(f"magnitude-prune: ratio must be in [0, 1), got {self.ratio}")
            if self.scope not in ("layer", "global"):
                raise PipelineError(f"magnitude-prune: scope must be layer or global, got {self.scope!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in _targets(gm, self.config.keep_output, tuple(self.config.ignore))
                 if not n.meta.get("fxopt_sparsity")]
        if not nodes or self.config.ratio == 0:
            return PassResult(False, info={"why": "ratio=0" if nodes else
                                           "no conv or linear besides the kept output layer"})
        weights = [attr_tensor(gm, n.args[1]).detach() for n in nodes]
        if self.config.scope == "global":
            scores = torch.cat([w.abs().flatten() for w in weights])
            k = int(self.config.ratio * scores.numel())
            cut = scores.kthvalue(k).values if k > 0 else scores.min() - 1
            masks = [w.abs() > cut for w in weights]
        else:
            masks = []
            for w in weights:
                k = int(self.config.ratio * w.numel())
                cut = w.abs().flatten().kthvalue(k).values if k > 0 else w.abs().min() - 1
                masks.append(w.abs() > cut)
        done = {module_path(n) or n.name: round(_apply(gm, n, m, "unstructured"), 3)
                for n, m in zip(nodes, masks)}
        erase_dead(gm)
        return PassResult(True, frozenset({"shapes"}), {"layers": len(done), "density": done})

"""Pruning masks: the convention the sparsity passes and training share.

A pruned weight ``W`` of a module keeps its mask as a buffer named ``W_mask`` next to it
(1 where the weight is kept). Fine-tuning reapplies the masks after every optimizer step;
gradual pruning recomputes them at each sparsity level.
"""
from __future__ import annotations

import torch

__all__ = ["MASK_SUFFIX", "reapply_masks", "set_sparsity", "sparsity_report"]

MASK_SUFFIX = "_mask"


def reapply_masks(model: torch.nn.Module) -> int:
    """Zero the pruned weights again (after an optimizer step). Returns how many tensors it masked."""
    n = 0
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(MASK_SUFFIX):
                owner, _, attr = name[: -len(MASK_SUFFIX)].rpartition(".")
                mod = model.get_submodule(owner) if owner else model
                w = getattr(mod, attr, None)
                if isinstance(w, torch.Tensor):
                    w.mul_(buf)
                    n += 1
    return n


def sparsity_report(model: torch.nn.Module) -> dict[str, float]:
    """Fraction of zeros in each masked weight."""
    out = {}
    for name, buf in model.named_buffers():
        if name.endswith(MASK_SUFFIX):
            owner, _, attr = name[: -len(MASK_SUFFIX)].rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            w = getattr(mod, attr)
            out[name[: -len(MASK_SUFFIX)]] = float((w == 0).float().mean())
    return out


def set_sparsity(model: torch.nn.Module, sparsity: float) -> int:
    """Recompute every pruning mask so each masked weight has ``sparsity`` of its entries at zero
    (smallest magnitudes first), and apply it. Returns how many weights it touched."""
    n = 0
    with torch.no_grad():
        for name, buf in list(model.named_buffers()):
            if not name.endswith(MASK_SUFFIX):
                continue
            owner, _, attr = name[: -len(MASK_SUFFIX)].rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            w = getattr(mod, attr, None)
            if not isinstance(w, torch.Tensor):
                continue
            k = int(sparsity * w.numel())
            if k <= 0:
                mask = torch.ones_like(w, dtype=torch.bool)
            else:
                cut = w.abs().flatten().kthvalue(k).values
                mask = w.abs() > cut
            buf.copy_(mask.to(buf.dtype))
            w.mul_(buf)
            n += 1
    return n

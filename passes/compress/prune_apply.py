"""Applying ``prune``'s decisions: which channels stay (:func:`balanced_topk`, :func:`kept_count`) and the
rewrite of one channel group (:func:`prune_group`, with the least-squares re-fit of its readers). Used by
the pass and by ``allocation=sensitivity``'s trials (:mod:`fxopt.passes.compress.prune_allocation`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import is_linear, module_path
from fxopt.passes.analysis.channel_members import ChannelGroup, Produces, Reads, _blocks
from fxopt.passes.compress.prune_stats import reconstruct_reader, refit

__all__ = ["balanced_topk", "apply_group", "kept_count", "prune_group"]


def balanced_topk(scores: torch.Tensor, k: int, cuts: list[int]) -> torch.Tensor:
    """The best ``k`` channels, each block between ``cuts`` keeping its share (at least one), sorted."""
    size = scores.numel()
    if len(cuts) <= 2:
        return torch.sort(torch.topk(scores, k).indices).values
    lens = [b - a for a, b in zip(cuts, cuts[1:])]
    share = [n * k / size for n in lens]
    quota = [min(n, max(1, int(s))) for n, s in zip(lens, share)]
    # largest remainders first, until the quotas add up to k (or every block is full)
    for i in sorted(range(len(lens)), key=lambda i: int(share[i]) - share[i]):
        if sum(quota) >= k:
            break
        if quota[i] < lens[i]:
            quota[i] += 1
    picks = [a + torch.topk(scores[a:b], q).indices for a, b, q in zip(cuts, cuts[1:], quota)]
    return torch.sort(torch.cat(picks)).values


def apply_group(gm: fx.GraphModule, g: ChannelGroup, keep: torch.Tensor) -> None:
    """Rewrite every member of ``g`` to keep the channels ``keep`` (each member knows how)."""
    for m in g.members:
        m.prune(gm, g, keep)


def kept_count(g: ChannelGroup, ratio: float | None, c: Any, k: int | None = None) -> int:
    """How many channels of ``g`` stay when ``ratio`` of them go (or ``k`` stay), after ``c``'s (the prune
    config's) ``min_channels``,
    ``round_to`` and a grouped conv's equal share per group."""
    k = g.size - int(ratio * g.size) if k is None else k
    k = max(c.min_channels, k)
    if c.round_to > 1:
        k = min(g.size, -(-k // c.round_to) * c.round_to)
    blocks = g.blocks
    if blocks > 1:  # grouped convs: the same number of channels in every group
        k = min(g.size, max(blocks, -(-k // blocks) * blocks))
    return k


def prune_group(gm: fx.GraphModule, g: ChannelGroup, keep: torch.Tensor, stats: dict | None,
                refits: dict, declined: dict) -> None:
    """Keep the channels ``keep`` of ``g``; with ``stats`` (``reconstruct``), the linear readers are
    re-fitted on them where that beats slicing (``refits``/``declined`` collect what happened)."""
    fits = _refits(gm, g, keep, stats, refits, declined) if stats is not None else {}
    apply_group(gm, g, keep)
    for node, (w, b) in fits.items():
        # a reader that also produces these channels (h + fc(h)) just lost the same rows
        rows = next((_blocks(keep, m.block) for m in g.of(Produces) if m.node is node), None)
        reconstruct_reader(gm, node, w if rows is None else w[rows], b if rows is None else b[rows])


def _refits(gm: fx.GraphModule, g: ChannelGroup, keep: torch.Tensor, stats: dict, done: dict,
            declined: dict) -> dict:
    """node -> (weight, bias) re-fitted on the kept channels, for every linear reader of ``g`` that
    can be and whose re-fit beats slicing on held-back batches (see prune_stats)."""
    out = {}
    for m in g.of(Reads):
        st = stats.get(m.node.name)
        name = module_path(m.node) or m.node.name
        if st is None or st.gram is None:   # collect_reader_stats asked for a Gram only where it may re-fit
            if is_linear(m.node):
                declined[name] = "no calibration rows reached it" if st is not None and st.want_gram \
                    else "its weight is shared, or it reads other channels too"
            continue
        fit, info = refit(gm, m.node, _blocks(keep, m.block), st)
        if fit is None:
            declined[name] = info["why"]
        else:
            out[m.node] = fit
            done[name] = round(info["held_back_error"], 4)
    return out

"""``prune``: structured channel pruning that physically shrinks the model.

For every prunable channel group found by the ``channel-groups`` analysis (a conv or
linear output plus everything coupled to it: batch norms, the layers reading it,
residual partners, depthwise convs, flatten sizes), the pass keeps the ``1 - ratio``
most important channels and slices every member: producer weight rows and biases,
consumer weight columns (``C x H x W`` blocks after a flatten), norm parameters and
statistics, depthwise ``groups``, and the literal sizes of flattening views. FLOPs,
parameters and bytes fall with the channel count, and the model runs at any batch size.

Importance: ``l1`` / ``l2`` norms of the producers' weight rows (each producer normalized
by its mean, so residual partners weigh alike), ``bn`` (|gamma| of the group's batch
norms, falling back to l1), or ``taylor``: first-order Taylor ``|w * dL/dw|`` summed per
channel, with gradients from the calibration data (``compile(..., calibration=loader,
calibration_inputs=0)`` for ``(inputs, labels)`` pairs: cross entropy; otherwise the
mean squared output; the example inputs when no data is given). Channel counts can be rounded up to a multiple
(``round_to=8``) for fast kernels. Groups whose producers match ``ignore`` are kept, and
so are the ones that reach the model outputs (the classifier keeps its classes).

How many channels go: ``ratio`` of every group (``scope=local``, the default), or with
``scope=global`` the ``ratio`` least important channels of the whole model, each score
relative to its group's mean, at most ``max_ratio`` (0.9) of any one group. Per-layer
ratios override either: ``ratios=['layer4.*=0.7', 'layer1.*=0.2']`` (module-path globs
of the producers; first match wins).

Concatenations (DenseNet, Inception) prune per input: readers of a concatenation are
sliced at each segment's offset after every group is decided. Splits/chunks get their
part sizes rewritten (a space divided between parts keeps the same fraction in each), and
channel shuffles become an ``index_select`` of the kept channels (ShuffleNet). Attention
heads are pruned whole, with the head counts and merged sizes in views rewritten: separate
Q/K/V projections (BERT), ``nn.MultiheadAttention`` (ViT; its packed weight is unpacked at
capture), a packed ``qkv`` linear split by ``reshape/permute/select`` (Swin; unpacked
into three linears first), with ``sdpa`` or written out (``q @ k^T``, softmax, ``@ v``),
and per-head parameters mixed in on the way (Swin's relative position bias table) are
sliced by the kept heads, like per-channel layer scales. Grouped convolutions (ResNeXt,
RegNet, ShuffleNet v1) keep the same number of channels in every group, on both sides.
It changes numerics by design; fine-tune with ``fxopt.finetune`` afterwards.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import module_path
from fxopt.errors import PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import (add_param, arg, attr_tensor, erase_dead, unpack_packed_projections,
                                 unpack_split_params)

from fxopt.passes.analysis.channel_layouts import layout_mask
from fxopt.passes.analysis.dependency import ChannelGroup

__all__ = ["StructuredPrunePass", "group_importance"]


def taylor_gradients(gm: fx.GraphModule, ctx: PassContext, groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
    """id(weight) -> accumulated dLoss/dweight of every producer, over the calibration batches.

    The loss is cross entropy when calibration items are ``(inputs, labels)`` pairs (with
    ``calibration_inputs=0``) and the output is ``[N, classes]`` logits; otherwise the mean
    squared output (how much each weight moves the output's energy). Without calibration
    data the example inputs are used.
    """
    from fxopt.quant.calibrate import Inputs, normalize_item
    weights = {}
    for g in groups:
        for kind, n, _ in g.members:
            if kind in ("out", "dw"):
                w = attr_tensor(gm, n.args[1])
                if isinstance(w, torch.nn.Parameter):
                    weights[id(w)] = w
    flags = {k: w.requires_grad for k, w in weights.items()}
    grads = {k: torch.zeros_like(w) for k, w in weights.items()}
    pick = ctx.options.get("calibration_inputs")
    data = list(ctx.calibration) if ctx.calibration is not None else [Inputs(ctx.args, ctx.kwargs)]
    limit = ctx.options.get("calibration_batches") or 8
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for item in data[:limit]:
                args, kwargs = normalize_item(item, pick)
                out = gm(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                labels = item[1] if pick is not None and isinstance(item, (tuple, list)) and len(item) > 1 else None
                if isinstance(labels, torch.Tensor) and labels.dtype == torch.long and out.dim() == 2:
                    loss = torch.nn.functional.cross_entropy(out, labels)
                else:
                    loss = out.float().pow(2).mean()
                params = list(weights.values())
                for k, gr in zip(weights, torch.autograd.grad(loss, params, allow_unused=True)):
                    if gr is not None:
                        grads[k] += gr
    finally:
        for k, w in weights.items():
            w.requires_grad_(flags[k])
    return grads


def group_importance(gm: fx.GraphModule, g: ChannelGroup, kind: str,
                     grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of the group (higher = keep)."""
    if kind == "taylor" and grads is not None:
        score = torch.zeros(g.size)
        for k, n, extra in g.members:
            if k in ("out", "dw"):
                w = attr_tensor(gm, n.args[1])
                gr = grads.get(id(w))
                if gr is not None:
                    s = (w.detach() * gr).abs().reshape(w.shape[0], -1).sum(1).float()
                    if k == "out" and extra > 1:  # attention heads: rows come in blocks of head_dim
                        s = s.view(-1, extra).sum(1)
                    score += s / s.mean().clamp_min(1e-12)
        return score
    if kind == "bn":
        gammas = [attr_tensor(gm, n.args[1]) for k, n, _ in g.members if k == "bn" and n.args[1] is not None]
        if gammas:
            return sum(t.detach().abs().float() for t in gammas)
    score = torch.zeros(g.size)
    p = 1 if kind in ("l1", "bn") else 2
    for k, n, extra in g.members:
        if k in ("out", "dw"):
            w = attr_tensor(gm, n.args[1]).detach().float()
            s = w.reshape(w.shape[0], -1).norm(p=p, dim=1)
            if k == "out" and extra > 1:  # attention heads: rows come in blocks of head_dim
                s = s.view(-1, extra).sum(1)
            score += s / s.mean().clamp_min(1e-12)
    return score


def _slice(gm: fx.GraphModule, node: fx.Node, index: int, dim: int, keep: torch.Tensor, tag: str) -> None:
    """Replace ``node.args[index]`` (a weight read) by its slice along ``dim``."""
    src = node.args[index]
    t = attr_tensor(gm, src)
    if t is None:
        return
    new = add_param(gm, f"{src.name}_{tag}", t.detach().index_select(dim, keep), node,
                    t.requires_grad if isinstance(t, torch.nn.Parameter) else False)
    if not isinstance(t, torch.nn.Parameter):  # statistics stay buffers
        value = getattr(gm, new.target)
        delattr(gm, new.target)
        gm.register_buffer(new.target, value.detach())
    args = list(node.args)
    args[index] = new
    node.args = tuple(args)


def _gather_group_inputs(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, groups: int, size: int) -> None:
    """A grouped conv keeps, for the rows of each group, the kept input channels of that group."""
    src = node.args[1]
    w = attr_tensor(gm, src)
    per_in, per_keep = size // groups, len(keep) // groups
    local = keep.view(groups, per_keep) - (torch.arange(groups) * per_in)[:, None]    # [groups, per_keep]
    cols = local.repeat_interleave(w.shape[0] // groups, dim=0)                       # [rows, per_keep]
    new_w = w.detach().gather(1, cols.reshape(*cols.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:]))
    new = add_param(gm, f"{src.name}_pruned", new_w, node, isinstance(w, torch.nn.Parameter) and w.requires_grad)
    args = list(node.args)
    args[1] = new
    node.args = tuple(args)


def _slice_grouped(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, groups: int, size: int) -> None:
    """A grouped C -> C conv keeps output rows ``keep`` and, in each group, the kept inputs of that group."""
    _slice(gm, node, 1, 0, keep, "pruned")
    if arg(node, 2, "bias") is not None:
        _slice(gm, node, 2, 0, keep, "pruned")
    _gather_group_inputs(gm, node, keep, groups, size)


def _balanced_topk(scores: torch.Tensor, k: int, cuts: list[int]) -> torch.Tensor:
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


def _global_counts(todo: list, c: "StructuredPrunePass.Config") -> dict[int, int]:
    """``scope=global``: how many channels each group keeps when the ``ratio`` least important
    channels of the whole model go (scores relative to their group's mean; at most ``max_ratio``
    of any group). Groups with a per-layer ``ratios`` entry are left out of the pool."""
    pool = [(g, s / s.mean().clamp_min(1e-12)) for g, _, r, s in todo if r is None]
    if not pool:
        return {}
    flat = torch.cat([s for _, s in pool])
    owner = torch.cat([torch.full((g.size,), i) for i, (g, _) in enumerate(pool)])
    removed = [0] * len(pool)
    cap = [min(int(c.max_ratio * g.size), g.size - c.min_channels) for g, _ in pool]
    budget = int(c.ratio * flat.numel())
    for i in torch.argsort(flat, stable=True).tolist():
        if budget == 0:
            break
        o = int(owner[i])
        if removed[o] < cap[o]:
            removed[o] += 1
            budget -= 1
    return {id(g): g.size - removed[i] for i, (g, _) in enumerate(pool)}


def apply_group(gm: fx.GraphModule, g: ChannelGroup, keep: torch.Tensor) -> None:
    k = len(keep)
    for kind, n, extra in g.members:
        if kind == "out":
            rows = keep if extra == 1 else (keep[:, None] * extra + torch.arange(extra)[None, :]).reshape(-1)
            _slice(gm, n, 1, 0, rows, "pruned")
            if arg(n, 2, "bias") is not None:
                _slice(gm, n, 2, 0, rows, "pruned")
        elif kind in ("heads", "merge"):  # literal sizes in attention views: head count, or heads * dim
            dim, old = extra
            sizes = list(n.args[1])
            if sizes[dim] == old:
                sizes[dim] = k if kind == "heads" else old // g.size * k
                n.args = (n.args[0], sizes) + tuple(n.args[2:])
        elif kind == "dw":
            _slice(gm, n, 1, 0, keep, "pruned")
            if arg(n, 2, "bias") is not None:
                _slice(gm, n, 2, 0, keep, "pruned")
            _set_groups(n, k)
        elif kind == "gconv":
            _slice_grouped(gm, n, keep, extra, g.size)
        elif kind == "pbias":   # a parameter-derived per-channel operand (layer scale, position bias)
            reader, at, dim, views = extra
            _slice(gm, reader, at, dim, keep, "pruned")
            for view, d in views:
                sizes = list(view.args[1])
                sizes[d] = k
                view.args = (view.args[0], sizes) + tuple(view.args[2:])
        elif kind == "gin":
            _gather_group_inputs(gm, n, keep, extra, g.size)
        elif kind == "in":
            idx = keep if extra == 1 else (keep[:, None] * extra + torch.arange(extra)[None, :]).reshape(-1)
            _slice(gm, n, 1, 1, idx, "pruned_in")
        elif kind == "bn":
            for i in (1, 2, 3, 4):
                if n.args[i] is not None:
                    _slice(gm, n, i, 0, keep, "pruned")
        elif kind == "ln":
            args = list(n.args)
            args[1] = [k]
            n.args = tuple(args)
            for i in (2, 3):
                if len(n.args) > i and n.args[i] is not None:
                    _slice(gm, n, i, 0, keep, "pruned")
        elif kind == "flatten" and len(n.args) > 1 and isinstance(n.args[1], (list, tuple)):
            sizes = list(n.args[1])
            if len(sizes) == 2 and isinstance(sizes[1], int) and sizes[1] == g.size * extra:
                sizes[1] = k * extra
                n.args = (n.args[0], sizes) + tuple(n.args[2:])


def apply_layout(gm: fx.GraphModule, node: fx.Node, kind: str, extra: Any, decided: dict) -> None:
    """Rewrite a reader of a layout (concatenation, split part, shuffle) for the kept channels."""
    if kind == "split":   # new part sizes: the kept channels of each part
        layout, parts = extra
        counts = [int(layout_mask(p, decided).sum()) for p in parts]
        if counts != [sum(e[1] for e in p) for p in parts]:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], counts, dim), {}
        return
    if kind == "shuffle":  # a gather of the kept channels in shuffled order
        flat, perm, src = extra
        mask = layout_mask(flat, decided)
        if bool(mask.all()):
            return
        pos = torch.cumsum(mask.long(), 0) - 1
        perm = torch.tensor(perm)
        order = pos[perm[mask[perm]]]
        idx = add_param(gm, f"{node.name}_order", order, node)
        with gm.graph.inserting_before(node):
            gather = gm.graph.call_function(torch.ops.aten.index_select.default, (src, 1, idx))
        gather.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(gather)
        return
    mask = layout_mask(extra, decided)
    if bool(mask.all()):
        return
    idx = mask.nonzero().flatten()
    if kind == "seg_flatten":  # a literal [N, C] view size
        if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
            sizes = list(node.args[1])
            if len(sizes) == 2 and sizes[1] == mask.numel():
                sizes[1] = len(idx)
                node.args = (node.args[0], sizes) + tuple(node.args[2:])
        return
    if kind == "seg_in":
        _slice(gm, node, 1, 1, idx, "pruned_in")
    elif kind == "seg_dw":
        _slice(gm, node, 1, 0, idx, "pruned")
        if arg(node, 2, "bias") is not None:
            _slice(gm, node, 2, 0, idx, "pruned")
        _set_groups(node, len(idx))
    else:
        for i in (1, 2, 3, 4):
            if node.args[i] is not None:
                _slice(gm, node, i, 0, idx, "pruned")


def _set_groups(node: fx.Node, groups: int) -> None:
    args = list(node.args)
    while len(args) < 7:
        args.append([1, 1] if len(args) in (3, 5) else [0, 0] if len(args) == 4 else 1)
    args[6] = groups
    node.args = tuple(args)


@register_pass
class StructuredPrunePass(Pass):
    """Remove whole channels of convs/linears and everything coupled to them (see module docs)."""

    name = "prune"
    reads_options = ("calibration_inputs", "calibration_batches")
    preserves_semantics = False

    @dataclass(frozen=True)
    class Config:
        ratio: float = 0.5
        importance: str = "l1"
        round_to: int = 1
        min_channels: int = 1
        ignore: tuple = ()
        ratios: tuple = ()
        scope: str = "local"
        max_ratio: float = 0.9

        def __post_init__(self) -> None:
            if not 0 <= self.ratio < 1:
                raise PipelineError(f"prune: ratio must be in [0, 1), got {self.ratio}")
            if self.importance not in ("l1", "l2", "bn", "taylor"):
                raise PipelineError(f"prune: importance must be l1, l2, bn or taylor, got {self.importance!r}")
            if self.scope not in ("local", "global"):
                raise PipelineError(f"prune: scope must be local or global, got {self.scope!r}")
            if not 0 < self.max_ratio < 1:
                raise PipelineError(f"prune: max_ratio must be in (0, 1), got {self.max_ratio}")
            for f in ("ignore", "ratios"):
                if isinstance(getattr(self, f), str):
                    object.__setattr__(self, f, tuple(x for x in getattr(self, f).split(",") if x))
            for item in self.ratios:
                glob, eq, r = str(item).rpartition("=")
                try:
                    ok = bool(eq and glob) and 0 <= float(r) < 1
                except ValueError:
                    ok = False
                if not ok:
                    raise PipelineError(f"prune: ratios entry {item!r} must read 'GLOB=RATIO' with RATIO in "
                                        "[0, 1), e.g. ratios=['layer4.*=0.7', 'layer1.*=0.2']")

        def ratio_for(self, names: list[str]) -> float | None:
            """The per-layer ratio of the first ``ratios`` glob matching a producer, or None."""
            for item in self.ratios:
                glob, _, r = str(item).rpartition("=")
                if any(fnmatch.fnmatch(nm, glob) for nm in names):
                    return float(r)
            return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = self.config
        pruned, kept = {}, []
        decided: dict[int, torch.Tensor] = {}
        readers: dict[tuple, list] = {}   # (node, kind) -> layout, for readers of concatenations
        # packed Q/K/V weights and projections: one parameter and one linear per projection
        unpacked = unpack_split_params(gm) + unpack_packed_projections(gm)
        if unpacked:
            propagate_meta(gm)
        if unpacked:  # the graph changed inside this pass: what the manager cached is stale
            ctx.analyses.invalidate() if ctx.analyses is not None else None
        groups = ctx.analysis("channel-groups", gm)  # through the analysis manager (cached)
        grads = taylor_gradients(gm, ctx, [g for g in groups if g.prunable]) if c.importance == "taylor" else None
        for g in groups:
            for kind, n, extra in g.members:
                if kind in ("seg_in", "seg_bn", "seg_dw", "seg_flatten", "split", "shuffle"):
                    readers[(n, kind)] = extra
        todo = []
        for g in groups:
            names = list(dict.fromkeys(module_path(p) or p.name for p in g.producers))
            if not g.prunable or any(fnmatch.fnmatch(nm, pat) for nm in names for pat in c.ignore):
                kept.append(g.describe())
                continue
            todo.append((g, names, c.ratio_for(names), group_importance(gm, g, c.importance, grads)))
        targets = _global_counts(todo, c) if c.scope == "global" else {}
        for g, names, r, scores in todo:
            k = targets[id(g)] if id(g) in targets else g.size - int((c.ratio if r is None else r) * g.size)
            k = max(c.min_channels, k)
            if c.round_to > 1:
                k = min(g.size, -(-k // c.round_to) * c.round_to)
            blocks = g.blocks
            if blocks > 1:  # grouped convs: the same number of channels in every group
                k = min(g.size, max(blocks, -(-k // blocks) * blocks))
            if k >= g.size:
                continue
            keep = _balanced_topk(scores, k, g.cuts)
            apply_group(gm, g, keep)
            decided[id(g)] = keep
            pruned["+".join(names)] = f"{g.size}->{k}"
        for (n, kind), layout in readers.items():
            apply_layout(gm, n, kind, layout, decided)
        if not pruned:
            return PassResult(bool(unpacked), frozenset(), {"kept": kept, "unpacked": unpacked})
        for n in gm.graph.nodes:  # shapes changed downstream: recompute every fake value
            if n.op in ("call_function", "get_attr"):
                n.meta.pop("val", None)
        erase_dead(gm)
        propagate_meta(gm)
        return PassResult(True, frozenset(), {"groups_pruned": len(pruned), "channels": pruned,
                                              "groups_kept": len(kept)})

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
mean squared output; the example inputs when no data is given), or ``activation``: what each channel
moves in the layers that read it, ``||W[:, c]||^2 * E[x_c^2]`` over the calibration data. With
``reconstruct=true`` every linear reading a pruned group is re-fitted by least squares on the channels
it keeps, so that its outputs stay as close as they can to the unpruned ones (the bias absorbs the mean
of what was removed); a re-fit is kept only where it beats plain slicing on calibration batches held
back from the fit (:mod:`fxopt.passes.compress.prune_stats`; give 8+ batches). Channel counts can be rounded up to a multiple
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
sliced by the kept heads, like per-channel layer scales. GPT-2's ``c_attn`` (one linear split
into Q, K and V) is unpacked first. Grouped-query attention (Llama, Mistral, Gemma) prunes whole
key/value groups: a removed key/value head takes the query heads that read it, and the cache a
decoder returns keeps the pruned head count (it is the pruned model's own cache). A parameter
used several times (ALBERT's one layer at every depth) is sliced once, the same way for every
use, so the model really shrinks. Grouped convolutions (ResNeXt,
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
from fxopt.ir.rewrite_utils import (attr_tensor, erase_dead, unpack_packed_projections, unpack_split_params,
                                   unpack_split_projections)

from fxopt.passes.analysis.channel_members import (BatchNorm, ChannelGroup, Depthwise, LayoutMember, Produces,
                                                   end_slicing)
from fxopt.passes.compress.prune_apply import balanced_topk, kept_count, prune_group
from fxopt.passes.compress.prune_stats import activation_importance, collect_reader_stats

__all__ = ["StructuredPrunePass", "group_importance"]


def _first_float(out: Any) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first floating-point tensor of a tuple, dict or
    Hugging Face ``ModelOutput`` (``last_hidden_state``, ``logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = list(out.values()) if hasattr(out, "values") and callable(out.values) else list(out) \
        if isinstance(out, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
        if isinstance(v, (tuple, list, dict)):
            try:
                return _first_float(v)
            except TypeError:
                continue
    raise TypeError(f"taylor importance: no floating-point tensor in the model output ({type(out).__name__})")


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
        for m in g.of((Produces, Depthwise)):
            w = attr_tensor(gm, m.node.args[1])
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
                out = _first_float(out)
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
        for m in g.of((Produces, Depthwise)):
            w = attr_tensor(gm, m.node.args[1])
            gr = grads.get(id(w))
            if gr is not None:
                s = (w.detach() * gr).abs().reshape(w.shape[0], -1).sum(1).float()
                score += _per_channel(s, m)
        return score
    if kind == "bn":
        gammas = [(attr_tensor(gm, m.node.args[1]), m.block) for m in g.of(BatchNorm) if m.node.args[1] is not None]
        if gammas:   # a norm before a head split has head_dim entries per channel
            return sum(t.detach().abs().float().view(-1, b).sum(1) for t, b in gammas)
    score = torch.zeros(g.size)
    p = 1 if kind in ("l1", "bn") else 2
    for m in g.of((Produces, Depthwise)):
        w = attr_tensor(gm, m.node.args[1]).detach().float()
        score += _per_channel(w.reshape(w.shape[0], -1).norm(p=p, dim=1), m)
    return score


def _per_channel(rows: torch.Tensor, m: Any) -> torch.Tensor:
    """Row scores summed per channel (attention heads: ``block`` rows each), normalized by their mean."""
    if isinstance(m, Produces) and m.block > 1:
        rows = rows.view(-1, m.block).sum(1)
    return rows / rows.mean().clamp_min(1e-12)


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


IMPORTANCES = ("l1", "l2", "bn", "taylor", "activation")


@register_pass
class StructuredPrunePass(Pass):
    """Remove whole channels of convs/linears and everything coupled to them (see module docs)."""

    name = "prune"
    reads_options = ("calibration_inputs", "calibration_batches")
    preserves_semantics = False
    compresses = True

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
        reconstruct: bool = False
        allocation: str = "uniform"

        def __post_init__(self) -> None:
            if not 0 <= self.ratio < 1:
                raise PipelineError(f"prune: ratio must be in [0, 1), got {self.ratio}")
            if self.importance not in IMPORTANCES:
                raise PipelineError(f"prune: importance must be one of {', '.join(IMPORTANCES)}, got "
                                    f"{self.importance!r}")
            if self.scope not in ("local", "global"):
                raise PipelineError(f"prune: scope must be local or global, got {self.scope!r}")
            if self.allocation not in ("uniform", "sensitivity"):
                raise PipelineError(f"prune: allocation must be uniform or sensitivity, got {self.allocation!r}")
            if self.allocation == "sensitivity" and self.scope == "global":
                raise PipelineError("prune: allocation=sensitivity decides how much each group loses itself; "
                                    "it does not combine with scope=global (drop one of them)")
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
        try:
            return self._prune(gm, ctx)
        finally:
            end_slicing(gm)

    def _prune(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = self.config
        pruned, kept, heads = {}, [], 0
        decided: dict[int, torch.Tensor] = {}
        readers: dict[tuple, LayoutMember] = {}   # (node, kind) -> reader of a concatenation, split or shuffle
        # packed Q/K/V weights and projections: one parameter and one linear per projection
        unpacked = unpack_split_params(gm) + unpack_packed_projections(gm) + unpack_split_projections(gm)
        if unpacked:
            propagate_meta(gm)
        if unpacked:  # the graph changed inside this pass: what the manager cached is stale
            ctx.analyses.invalidate() if ctx.analyses is not None else None
        groups = ctx.analysis("channel-groups", gm)  # through the analysis manager (cached)
        prunable = [g for g in groups if g.prunable]
        grads = taylor_gradients(gm, ctx, prunable) if c.importance == "taylor" else None
        stats = collect_reader_stats(gm, ctx, prunable, c.reconstruct) \
            if c.importance == "activation" or c.reconstruct else {}
        fallback, refits, declined = [], {}, {}
        for g in groups:
            for m in g.of(LayoutMember):
                readers[(m.node, m.kind)] = m
        todo = []
        for g in groups:
            names = list(dict.fromkeys(module_path(p) or p.name for p in g.producers))
            if not g.prunable or any(fnmatch.fnmatch(nm, pat) for nm in names for pat in c.ignore):
                kept.append(g.describe())
                continue
            scores = activation_importance(gm, g, stats) if c.importance == "activation" else None
            if c.importance == "activation" and scores is None:
                fallback.append("+".join(names))   # no conv/linear reads it: the producers' weights decide
            if scores is None:
                scores = group_importance(gm, g, "l1" if c.importance == "activation" else c.importance, grads)
            todo.append((g, names, c.ratio_for(names), scores))
        allocation = None
        if c.allocation == "sensitivity":
            from fxopt.passes.compress.prune_allocation import allocate
            allocation = allocate(gm, ctx, groups, todo, c, stats)
            targets = allocation.targets
        else:
            targets = _global_counts(todo, c) if c.scope == "global" else {}
        for g, names, r, scores in todo:
            k = kept_count(g, None, c, targets[id(g)]) if id(g) in targets else \
                kept_count(g, c.ratio if r is None else r, c)
            if k >= g.size:
                continue
            keep = balanced_topk(scores, k, g.cuts)
            prune_group(gm, g, keep, stats if c.reconstruct else None, refits, declined)
            decided[id(g)] = keep
            pruned["+".join(names)] = f"{g.size}->{k}"
            heads += g.heads
        for m in readers.values():
            m.prune_layout(gm, decided)
        if not pruned:
            if unpacked:   # the packed originals nobody reads any more
                erase_dead(gm)
            return PassResult(bool(unpacked), frozenset(), {"kept": kept, "unpacked": unpacked})
        for n in gm.graph.nodes:  # shapes changed downstream: recompute every fake value
            if n.op in ("call_function", "get_attr"):
                n.meta.pop("val", None)
        erase_dead(gm)
        propagate_meta(gm)
        details = {"groups_pruned": len(pruned), "channels": pruned, "groups_kept": len(kept),
                   "head_groups_pruned": heads}
        if c.importance == "activation":
            details["importance_from_weights"] = fallback
        if c.reconstruct:
            details["reconstructed"] = refits
            details["not_reconstructed"] = declined
        if allocation is not None:
            details["allocation"] = allocation.details
        return PassResult(True, frozenset(), details)

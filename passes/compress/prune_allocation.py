"""``prune(allocation=sensitivity)``: how much of each channel group to remove, from measured damage.

A uniform ``ratio`` takes the same share of every group, but groups differ: on the pretrained MiniLM,
pruning half of the last layer alone moves the embeddings five times as much as half of the first. With
``allocation=sensitivity`` the pass measures, for every prunable group ``g`` and every level ``r`` of a
grid (``LEVELS``, plus ``ratio`` itself, at most ``max_ratio``):

* ``damage[g, r]``: the relative squared error of the model's outputs when ``g`` alone loses ``r`` of its
  channels, exactly as the pass would remove them (same importance, same re-fit with ``reconstruct``),
  against the unpruned outputs, on the first ``SENSITIVITY_BATCHES`` calibration batches (the example
  inputs without calibration data; padding tokens left out where a batch carries an ``attention_mask``);
  each output counts alike;
* ``cost[g, r]``: the parameters that removes (counted on the pruned copy).

It then picks one level per group minimizing the summed damage while removing at least the parameters
the uniform ``ratio`` removes (a multiple-choice knapsack, solved exactly by dynamic programming over
the parameter budget in ``BUDGET_STEPS`` steps). Damages of different groups are treated as additive, the
approximation of SPDY (Frantar & Alistarh 2022) and OWL-style layer-wise allocations: it holds for the
small errors one group makes. Groups with a ``ratios`` entry keep their ratio and stay out of the budget.

Cost: one pruned copy and one forward pass per (group, level): MiniLM (12 groups) takes about a
minute on 2 cores; a progress bar shows it (``progress``). The pass details (``history``) list each
group's chosen ratio, its measured damage, and the total against the uniform allocation's.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import PipelineError
from fxopt.ir.graph_utils import param_stats, preserved_state
from fxopt.ir.torch_compat import torch_internals
from fxopt.quant.calibrate import normalize_item, token_mask

__all__ = ["allocate", "Allocation", "LEVELS", "SENSITIVITY_BATCHES", "choose_levels"]

#: the ratios tried for every group (the recipe's ``ratio`` is added)
LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)
#: calibration batches the damage is measured on (besides the example inputs)
SENSITIVITY_BATCHES = 4
#: resolution of the parameter budget in the dynamic program
BUDGET_STEPS = 4000


@dataclass
class Allocation:
    targets: dict            # id(group) -> channels kept
    details: dict = field(default_factory=dict)


def choose_levels(options: list[list[tuple[int, float, Any]]], budget: int) -> list[Any] | None:
    """One option per group, ``(cost, damage, tag)``, removing at least ``budget`` in total with the least
    summed damage (every group may also stay untouched: tag None). Exact on the grid of ``budget /
    BUDGET_STEPS``; costs round down onto it, so what is chosen always removes the budget (and may pass it
    by under one step per group). None when even the largest costs do not reach the budget."""
    if budget <= 0:
        return [None] * len(options)
    n = BUDGET_STEPS
    unit = budget / n
    inf = math.inf
    best = torch.full((n + 1,), inf, dtype=torch.float64)
    best[0] = 0.0      # best[b]: least damage that removes at least b steps (b = n: the whole budget)
    tables = [best]

    def step(prev: torch.Tensor, units: int, damage: float) -> torch.Tensor:
        out = torch.full_like(prev, inf)
        out[units:n] = prev[:n - units] + damage
        out[n] = prev[n - units:].min() + damage    # every state this far from the end reaches the budget
        return out
    for opts in options:
        new = best.clone()
        for cost, damage, _ in opts:
            new = torch.minimum(new, step(best, min(n, max(0, int(cost / unit))), damage))
        best = new
        tables.append(best)
    if not math.isfinite(float(best[n])):
        return None
    chosen: list[Any] = [None] * len(options)
    state = n
    for i in range(len(options) - 1, -1, -1):     # read the choice back from the end
        prev, target = tables[i], float(tables[i + 1][state])
        if float(prev[state]) == target:
            continue                               # untouched explains it
        for cost, damage, tag in options[i]:
            units = min(n, max(0, int(cost / unit)))
            froms = range(state - units, state - units + 1) if state < n else range(max(0, n - units), n + 1)
            b = next((b for b in froms if b >= 0 and float(prev[b]) + damage == target), None)
            if b is not None:
                chosen[i], state = tag, b
                break
        else:  # pragma: no cover - the tables guarantee an explanation
            raise PipelineError("prune: allocation=sensitivity could not read back its choice (internal error)")
    return chosen


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask]
    return t


def _outputs(gm: fx.GraphModule, batches: list) -> list[list[torch.Tensor]]:
    out = []
    with torch.no_grad(), preserved_state(gm):
        for args, kwargs in batches:
            mask = token_mask(kwargs)
            out.append([_masked(t, mask) for t in _leaves(gm(*args, **kwargs))])
    return out


def damage_of(ref: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> float:
    """Relative squared error of ``got`` against ``ref``, per output over all batches, averaged over outputs."""
    if not ref or not ref[0]:
        return 0.0
    per_leaf = []
    for j in range(len(ref[0])):
        sig = sum(float(r[j].pow(2).sum()) for r in ref)
        err = sum(float((g[j] - r[j]).pow(2).sum()) for r, g in zip(ref, got))
        per_leaf.append(err / max(sig, 1e-30))
    value = sum(per_leaf) / len(per_leaf)
    return value if math.isfinite(value) else math.inf


def _batches(ctx: Any) -> list[tuple[tuple, dict]]:
    """The first calibration batches (any sequence length: a token batch need not be as long as the
    example), or the example inputs without calibration data."""
    limit = min(SENSITIVITY_BATCHES, ctx.options.get("calibration_batches") or SENSITIVITY_BATCHES)
    if ctx.calibration is None:
        return [(ctx.args, ctx.kwargs)]
    pick = ctx.options.get("calibration_inputs")
    return [normalize_item(item, pick) for item in itertools.islice(ctx.calibration, limit)] \
        or [(ctx.args, ctx.kwargs)]


def _trial(gm: fx.GraphModule, ctx: Any, index: int, keep: torch.Tensor, stats: dict | None,
           describe: str) -> fx.GraphModule:
    """A copy of ``gm`` with only group ``index`` pruned to ``keep``, the way the pass prunes it."""
    from fxopt.passes.analysis.channel_members import LayoutMember, end_slicing
    from fxopt.passes.compress.prune_apply import prune_group
    from fxopt.passmgr.analysis import get_analysis
    from fxopt.ir.rewrite_utils import erase_dead
    with torch_internals():
        dup = copy.deepcopy(gm)
    try:
        groups = get_analysis("channel-groups")().run(dup, ctx)
        g = groups[index] if index < len(groups) else None
        if g is None or g.describe() != describe:
            raise PipelineError("prune: allocation=sensitivity found different channel groups on a copy of the "
                                "graph (internal error); use the default allocation=uniform")
        prune_group(dup, g, keep, stats, {}, {})
        for m in g.of(LayoutMember):
            m.prune_layout(dup, {id(g): keep})
    finally:
        end_slicing(dup)
    erase_dead(dup)
    dup.recompile()
    return dup


def allocate(gm: fx.GraphModule, ctx: Any, groups: list, todo: list, c: Any, stats: dict) -> Allocation:
    """Channels to keep per group of ``todo`` (``(group, names, per-layer ratio, scores)``), see the module."""
    from tqdm.auto import tqdm

    from fxopt.passes.compress.prune_apply import balanced_topk, kept_count
    index = {id(g): i for i, g in enumerate(groups)}
    pool = [(g, names, scores) for g, names, r, scores in todo if r is None]
    if not pool:
        return Allocation({}, {"note": "every group has a ratios entry: nothing to allocate"})
    batches = _batches(ctx)
    ref = _outputs(gm, batches)
    base = param_stats(gm)[0]
    levels = sorted({*[lv for lv in LEVELS if lv <= c.max_ratio], c.ratio})
    work = []
    for g, names, scores in pool:
        ks = sorted({kept_count(g, lv, c) for lv in levels} - {g.size}, reverse=True)
        work += [(g, names, scores, k) for k in ks]
    measured: dict[tuple[int, int], tuple[int, float]] = {}
    show = ctx.options.get("progress")
    for g, names, scores, k in tqdm(work, desc="fxopt: prune sensitivity", disable=not show, leave=False):
        keep = balanced_topk(scores, k, g.cuts)
        dup = _trial(gm, ctx, index[id(g)], keep, stats if c.reconstruct else None, g.describe())
        measured[(id(g), k)] = (base - param_stats(dup)[0], damage_of(ref, _outputs(dup, batches)))
        del dup
    uniform = {id(g): kept_count(g, c.ratio, c) for g, _, _ in pool}
    budget = sum(measured[(id(g), uniform[id(g)])][0] for g, _, _ in pool if uniform[id(g)] < g.size)
    options = [[(measured[(id(g), k)][0], measured[(id(g), k)][1], k) for (gid, k) in measured if gid == id(g)]
               for g, _, _ in pool]
    chosen = choose_levels(options, budget)
    if chosen is None:   # cannot happen: the uniform choice itself meets the budget
        chosen = [uniform[id(g)] for g, _, _ in pool]
    targets, rows = {}, {}
    total, total_uniform = 0.0, 0.0
    for (g, names, _), k in zip(pool, chosen):
        k = g.size if k is None else k
        targets[id(g)] = k
        dmg = measured.get((id(g), k), (0, 0.0))[1]
        total += dmg
        total_uniform += measured.get((id(g), uniform[id(g)]), (0, 0.0))[1]
        rows["+".join(names[:1]) + (f" (+{len(names) - 1})" if len(names) > 1 else "")] = {
            "ratio": round(1 - k / g.size, 3), "kept": f"{k}/{g.size}", "damage": float(f"{dmg:.4g}")}
    removed = sum(measured.get((id(g), targets[id(g)]), (0, 0.0))[0] for g, _, _ in pool)
    details = {"groups": rows, "trials": len(work), "batches": len(batches),
               "params_removed": removed, "params_removed_uniform": budget,
               "summed_damage": float(f"{total:.4g}"), "summed_damage_uniform": float(f"{total_uniform:.4g}")}
    return Allocation(targets, details)

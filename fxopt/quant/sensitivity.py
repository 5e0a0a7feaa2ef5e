"""``fxopt.sensitivity``: how much each layer's quantization alone moves the model's outputs.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> rep = fxopt.sensitivity(model, (torch.randn(8, 16),), recipe="int8-dynamic")
    >>> [r["layer"] for r in rep.rows] == sorted(["0", "2"], key=lambda l: rep.by_layer[l]["cosine"])
    True
    >>> print(rep.table().splitlines()[0].split())
    ['layer', 'op', 'weight', 'activation', 'cosine', 'SQNR', 'dB']

Each row quantizes one layer (as the recipe's ``insert-qdq`` would) and keeps the
rest in float, then compares the outputs with the float model over the example inputs
and up to 4 calibration batches: the minimum per-sample cosine similarity and the
signal-to-quantization-noise ratio. Rows come worst (lowest cosine, then lowest SQNR)
first: the same scores drive ``insert-qdq(budget=...)``, which keeps the worst layers in
float until the whole model meets a cosine budget, so the order follows the budget's measure.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from fxopt.errors import PipelineError, RecipeError
from fxopt.ir.torch_compat import torch_internals
from fxopt.passmgr.pass_base import PassContext
from fxopt.quant.calibrate import iter_calibration
from fxopt.quant.plan import QuantTarget, collect_qparams, materialize, plan_targets

__all__ = ["sensitivity", "SensitivityReport", "sensitivity_scores", "output_similarity", "eval_batches",
           "quantized_copy", "run_outputs", "user_metric"]


class SensitivityReport:
    """Per-layer rows (dicts: layer, op, weight, activation, cosine, sqnr), worst first."""

    def __init__(self, rows: list[dict], recipe: str):
        self.rows, self.recipe = rows, recipe
        self.by_layer = {r["layer"]: r for r in rows}

    def table(self, max_rows: int | None = None) -> str:
        rows = self.rows[:max_rows] if max_rows else self.rows
        width = max([5] + [len(r["layer"]) for r in rows])
        lines = [f"{'layer':<{width}}  {'op':<9} {'weight':<14} {'activation':<14} {'cosine':>8} {'SQNR dB':>8}"]
        for r in rows:
            lines.append(f"{r['layer']:<{width}}  {r['op']:<9} {r['weight']:<14} {r['activation']:<14} "
                         f"{r['cosine']:>8.5f} {r['sqnr']:>8.2f}")
        if max_rows and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<SensitivityReport {self.recipe}: {len(self.rows)} layers>"


def sensitivity(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None, *,
                recipe: str = "int8-dynamic", calibration: Iterable | None = None,
                progress: bool | None = None, **options: Any) -> SensitivityReport:
    """Per-layer quantization sensitivity of ``model`` under ``recipe`` (see the module docs).

    ``recipe`` must contain an ``insert-qdq`` step; the steps before it run first (so
    batch norms are folded, SmoothQuant applied ...). Static recipes need
    ``calibration``. ``options`` reach the passes as in :func:`fxopt.compile`.
    """
    from fxopt.api import compile, resolve_recipe
    from fxopt.passmgr.pass_base import PassContext
    from fxopt.passmgr.pipeline import Pipeline
    from fxopt.passmgr.pass_base import get_pass
    insert_qdq = get_pass("insert-qdq")  # found through the registry: the core never imports a pass
    pipeline = resolve_recipe(recipe)
    steps = list(pipeline.steps)
    at = next((i for i, s in enumerate(steps) if isinstance(s, insert_qdq)), None)
    if at is None:
        raise RecipeError(f"recipe {recipe!r} has no insert-qdq step; sensitivity needs a quantization recipe "
                          "(int8, int8-dynamic, int8-weight, int4-weight)")
    gm = compile(model, args, kwargs, recipe=Pipeline(steps[:at]), calibration=calibration, progress=False,
                 **options)
    ex_args, ex_kwargs = gm.meta["fxopt_example_inputs"]  # normalized by capture
    ctx = PassContext(ex_args, ex_kwargs, calibration=calibration, options={**options, "progress": progress})
    targets = plan_targets(gm, steps[at].config)
    qparams = collect_qparams(gm, targets, ctx, steps[at].config.percentile)
    rows = sensitivity_scores(gm, targets, qparams, eval_batches(ctx), progress)
    return SensitivityReport(rows, str(recipe))


# ---------------------------------------------------------------- scoring (insert-qdq's budget uses it too)
def flat_outputs(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        return torch.zeros(1, 1)
    rows = leaves[0].shape[0] if leaves[0].dim() else 1
    parts = [t.detach().float().reshape(rows, -1) if t.dim() and t.shape[0] == rows else
             t.detach().float().reshape(1, -1).expand(rows, -1) for t in leaves]
    return torch.cat(parts, 1)


def output_similarity(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Min per-sample cosine and SQNR (dB) of ``got`` against ``ref`` (lists of [rows, features])."""
    cos = min(float(torch.nn.functional.cosine_similarity(a, b, dim=1).min()) for a, b in zip(ref, got))
    sig = sum(float(a.pow(2).sum()) for a in ref)
    noise = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, got))
    sqnr = 10 * math.log10(sig / noise) if noise > 0 else float("inf")
    return {"cosine": cos, "sqnr": sqnr}


def eval_batches(ctx: PassContext, limit: int = 4) -> list[tuple[tuple, dict]]:
    batches = [(ctx.args, ctx.kwargs)]
    if ctx.calibration is not None:
        for i, a, k in iter_calibration(ctx.calibration, inputs=ctx.options.get("calibration_inputs"),
                                        example=(ctx.args, ctx.kwargs), max_batches=limit, progress=False):
            batches.append((a, k))
    return batches


def run_outputs(gm: fx.GraphModule, batches: list) -> list[torch.Tensor]:
    from fxopt.ir.graph_utils import preserved_state
    with torch.no_grad(), preserved_state(gm):
        return [flat_outputs(gm(*a, **k)) for a, k in batches]


def quantized_copy(gm: fx.GraphModule, targets: list[QuantTarget], keep: set[str],
                    qparams: dict, residuals: bool = False) -> fx.GraphModule:
    """A deep copy of ``gm`` with ``targets`` quantized except the layers labelled in ``keep``."""
    memo: dict = {}
    with torch_internals():
        dup = copy.deepcopy(gm, memo)
    by_name = {n.name: n for n in dup.graph.nodes}
    sub = [QuantTarget(by_name[t.node.name], t.kind, t.path, t.weight, t.activation)
           for t in targets if t.label not in keep]
    materialize(dup, sub, qparams, residuals)
    dup.recompile()
    return dup


def sensitivity_scores(gm: fx.GraphModule, targets: list[QuantTarget], qparams: dict,
                       batches: list, progress: bool | None = None, ref: list | None = None) -> list[dict]:
    """Per layer: output cosine and SQNR when only that layer is quantized, worst first."""
    from tqdm.auto import tqdm
    ref = run_outputs(gm, batches) if ref is None else ref
    labels = list(dict.fromkeys(t.label for t in targets))
    rows = []
    for label in tqdm(labels, desc="fxopt: sensitivity", disable=not progress, leave=False):
        only = [t for t in targets if t.label == label]
        q = quantized_copy(gm, only, set(), qparams)
        sim = output_similarity(ref, run_outputs(q, batches))
        rows.append({"layer": label, "op": only[0].kind, "weight": str(only[0].weight),
                     "activation": str(only[0].activation) if only[0].activation else "-", **sim})
    rows.sort(key=lambda r: (r["cosine"], r["sqnr"]))  # the budget is a cosine: its worst layers first
    return rows


def user_metric(fn: Any, module: fx.GraphModule) -> float:
    from fxopt.errors import mark_user_error
    from fxopt.ir.graph_utils import preserved_state
    with torch.no_grad(), preserved_state(module):
        try:
            value = fn(module)
        except Exception as e:  # the user's metric failed: theirs to see, not a pass bug
            raise mark_user_error(e)
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"budget_metric must return a number (an accuracy), got {type(value).__name__}") from e

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

from typing import Any, Iterable

import torch

from .errors import RecipeError

__all__ = ["sensitivity", "SensitivityReport"]


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
    from .api import compile, resolve_recipe
    from .pass_base import PassContext
    from .pipeline import Pipeline
    from .passes.quantize import InsertQDQPass, _eval_batches, collect_qparams, plan_targets, sensitivity_scores
    pipeline = resolve_recipe(recipe)
    steps = list(pipeline.steps)
    at = next((i for i, s in enumerate(steps) if isinstance(s, InsertQDQPass)), None)
    if at is None:
        raise RecipeError(f"recipe {recipe!r} has no insert-qdq step; sensitivity needs a quantization recipe "
                          "(int8, int8-dynamic, int8-weight, int4-weight)")
    gm = compile(model, args, kwargs, recipe=Pipeline(steps[:at]), calibration=calibration, progress=False,
                 **options)
    ex_args, ex_kwargs = gm.meta["fxopt_example_inputs"]  # normalized by capture
    ctx = PassContext(ex_args, ex_kwargs, calibration=calibration, options={**options, "progress": progress})
    targets = plan_targets(gm, steps[at].config)
    qparams = collect_qparams(gm, targets, ctx, steps[at].config.percentile)
    rows = sensitivity_scores(gm, targets, qparams, _eval_batches(ctx), progress)
    return SensitivityReport(rows, str(recipe))

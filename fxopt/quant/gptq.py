"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"): the ``gptq`` weight observer.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes a linear's input columns one
at a time and spreads each column's rounding error over the columns not yet quantized, weighted by
the inverse of the layer's input Hessian ``H = X^T X`` (``X``: the layer's inputs on calibration
data), so the layer's *output* on inputs like the calibration data moves as little as it can. The
codes land on the same grid (same spec, same kernels, same bytes): only which code each weight gets
changes. Group scales are chosen (by the MSE search of the ``mse`` observer) when the first column
of the group is reached, from the error-compensated weights.

Measured (the pretrained MiniLM, ``int4-weight``, min cosine to fp32 over the 64 sentences of
``bench/quant.py``; ``python bench/recover.py --only minilm``): see the README's recovery table.

When GPTQ does not apply, the layer falls back to the ``mse`` observer and the pass record says
why: convolutions and embeddings (no input Hessian here), or too few calibration rows for the
layer's input width (:data:`MIN_ROWS_PER_INPUT` rows per input feature: with fewer, the Hessian
describes the calibration batch rather than the data and GPTQ fits that batch - measured on MiniLM:
one batch of 16 sentences made the unseen sentences worse than round-to-nearest).
"""
from __future__ import annotations

import math

import torch

from fxopt.errors import CalibrationError
from fxopt.quant.qspec import QSpec

__all__ = ["HessianObserver", "gptq_quantize", "collect_hessians", "MIN_ROWS_PER_INPUT"]

MIN_ROWS_PER_INPUT = 4
DAMP = 0.01  # of the mean Hessian diagonal, added to the diagonal (the paper's default)


class HessianObserver:
    """Accumulates ``X^T X`` over a linear's input rows (float64), and the row count."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.rows = 0
        self.finite = True

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point() or x.dim() == 0:
            raise CalibrationError(f"gptq: a linear's input must be a float tensor, got {x.dtype}")
        x2 = x.reshape(-1, x.shape[-1]).double()
        if not torch.isfinite(x2).all():
            self.finite = False  # recorded; the layer falls back to mse
            return
        h = x2.T @ x2
        self.h = h if self.h is None else self.h + h
        self.rows += x2.shape[0]


def _mse_params(rows: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    from fxopt.quant.observers import _mse_search
    return _mse_search(rows, rows.amin(1), rows.amax(1), spec)


def _inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``H^-1`` (dampened; more damping if H is not positive definite)."""
    mean = float(torch.diag(h).mean())
    for damp in (DAMP, DAMP * 10, DAMP * 100, 1.0):
        hd = h + damp * max(mean, 1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
        try:
            low = torch.linalg.cholesky(hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except RuntimeError:
            continue
    return None


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes, scales and zero points for linear weight ``w`` ``[out, in]`` given input Hessian ``h``.

    The result has the layout :func:`fxopt.quant.observers.weight_qparams` and
    :func:`fxopt.quant.qspec.quantize` give (``group``: scales ``[out, in // group_size]``;
    ``channel``: ``[out, 1]``; ``tensor``: a scalar), so the rest of the pipeline cannot tell it from
    round-to-nearest codes. ``None`` (the caller then rounds to nearest) when the Hessian cannot be
    factored even with heavy damping, when the result is not finite, or when it does not have a
    smaller output error ``tr(D H D^T)`` (``D``: the weight error) than round-to-nearest.
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise CalibrationError(f"gptq: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match")
    if spec.granularity == "channel" and spec.axis % w.dim() != 0:
        raise CalibrationError("gptq: per-channel scales must be per output channel (axis 0)")
    out_f, n = w.shape
    h = h.clone().double()
    dead = torch.diag(h) == 0  # inputs that were always zero: no compensation through them
    h[dead, dead] = 1.0
    u = _inverse_factor(h)
    if u is None:
        return None
    u = u.float()
    W = w.detach().float().clone()
    codes = torch.empty(out_f, n, dtype=torch.float32)
    gs = spec.group_size if spec.granularity == "group" else 0
    if gs:
        scales = torch.empty(out_f, n // gs)
        zps = torch.empty(out_f, n // gs, dtype=torch.int32)
    elif spec.granularity in ("channel", "tensor"):  # one scale per row (or for all) from the start
        s, z = _mse_params(W if spec.granularity == "channel" else W.reshape(1, -1), spec)
        s_c, z_c = s.expand(out_f), z.float().expand(out_f)
        scales, zps = (s.reshape(out_f, 1), z.reshape(out_f, 1)) if spec.granularity == "channel" else \
            (s.reshape(()), z.reshape(()))
    else:
        raise CalibrationError(f"gptq: weights cannot be quantized per {spec.granularity}")
    block = gs * max(1, 128 // gs) if gs else 128  # a block holds whole groups
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        W1 = W[:, b0:b1].clone()
        err = torch.zeros_like(W1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if gs and col % gs == 0:  # a new group: its scale from the error-compensated weights
                s, z = _mse_params(W1[:, i:i + gs], spec)
                scales[:, col // gs], zps[:, col // gs] = s, z
                s_c, z_c = s, z.float()
            x = W1[:, i]
            q = (torch.round(x * (1.0 / s_c)) + z_c).clamp(spec.qmin, spec.qmax)
            codes[:, col] = q
            e = (x - (q - z_c) * s_c) / u1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, b1:] -= err @ u[b0:b1, b1:]
    if not torch.isfinite(codes).all():
        return None
    # keep GPTQ only where it beats round-to-nearest on what it optimizes, the output error on the data
    from fxopt.quant.observers import weight_qparams
    from fxopt.quant.qspec import dequantize, quantize
    wf = w.detach().float()
    rtn_s, rtn_z = weight_qparams(wf, spec)
    rtn = dequantize(quantize(wf, rtn_s, rtn_z, spec.qmin, spec.qmax, gs), rtn_s, rtn_z, gs)
    mine = dequantize(codes, scales, zps, gs)
    hf = h.float()
    cost = [float(((d @ hf) * d).sum()) for d in (mine - wf, rtn - wf)]
    if not all(map(math.isfinite, cost)) or cost[0] >= cost[1]:
        return None
    return codes.to(spec.storage), scales, zps


def collect_hessians(gm, targets, ctx) -> tuple[dict[str, torch.Tensor], dict]:
    """Input Hessians of the linear targets whose weight spec is ``gptq``, keyed by weight attribute.

    The data is ``compile``'s ``calibration=`` (else the example inputs). Targets that share a weight
    add their Hessians (a weight used twice on one input counts that input once). Batches may differ
    from the example in any dim the graph is dynamic in (a sentence batch of another length); the
    graph's input guard rejects the others. Also returns the record for the pass's info: the rows seen
    and, per reason, the layers that fall back to ``mse``.
    """
    from fxopt.quant.calibrate import Inputs, observe
    wanted = [t for t in targets if t.weight.observer == "gptq"]
    fallback: dict[str, list[str]] = {}
    for t in wanted:
        if t.kind != "linear":
            fallback.setdefault(f"{t.kind}s have no input Hessian here (mse)", []).append(t.label)
    lin = [t for t in wanted if t.kind == "linear" and isinstance(t.node.args[0], torch.fx.Node)]
    if not lin:
        return {}, ({"fallback_mse": fallback} if fallback else {})
    observers: dict = {}
    for t in lin:
        observers.setdefault(t.node.args[0], HessianObserver())
    data = ctx.calibration if ctx.calibration is not None else [Inputs(ctx.args, ctx.kwargs)]
    observe(gm, observers, data, inputs=ctx.options.get("calibration_inputs") if ctx.calibration is not None
            else None, example=None, max_batches=ctx.options.get("calibration_batches"),
            progress=ctx.options.get("progress"))
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    seen: set[tuple[str, torch.fx.Node]] = set()
    for t in lin:
        obs = observers[t.node.args[0]]
        key = str(t.weight_node.target)
        if (key, t.node.args[0]) in seen:
            continue
        seen.add((key, t.node.args[0]))
        if not obs.finite:
            fallback.setdefault("non-finite calibration inputs (mse)", []).append(t.label)
        elif obs.h is None or obs.rows < MIN_ROWS_PER_INPUT * obs.h.shape[0]:
            fallback.setdefault(f"fewer than {MIN_ROWS_PER_INPUT} calibration rows per input feature (mse); "
                                "pass more calibration= batches", []).append(f"{t.label} ({obs.rows} rows)")
        else:
            out[key] = obs.h if key not in out else out[key] + obs.h
            rows[key] = rows.get(key, 0) + obs.rows
    info: dict = {"layers": len(out), "rows": max(rows.values(), default=0)}
    if fallback:
        info["fallback_mse"] = fallback
    return out, info

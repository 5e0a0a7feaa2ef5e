"""``insert-qdq``: explicit quantize/dequantize nodes around linears, convs and embeddings.

The pass turns ``linear(x, W, b)`` into::

    q  = fxopt.quantize(x, s_x, z_x, 0, 255)          # activation (static: calibrated s_x, z_x)
    xd = fxopt.dequantize(q, s_x, z_x)
    wd = fxopt.dequantize(W_int8, s_W, z_W)            # weight stored as int8, scale per channel
    y  = linear(xd, wd, b)

so the graph *simulates* integer arithmetic exactly in float, can be inspected, and
``lower-quant`` can swap each pattern for a real integer kernel. Each quantized layer's node
carries its specs as a typed :class:`~fxopt.quant.annotation.QuantAnnotation` (its text form
too, for display, and through ``fxopt.save``/``fxopt.load``). Weights are quantized
right away (their int8 tensors replace the fp32 ones, so model bytes already drop).

Config (all strings are :class:`~fxopt.quant.qspec.QSpec` text):

* ``weight``: ``int8/channel`` (default), ``int4/group128``, ``int8/channel/mse`` ...;
  the ``gptq`` observer (``int4/group128/asym/gptq``) rounds linear weights with GPTQ from the
  layer inputs' Hessian on ``calibration=`` data (else the example inputs), so the layer's output
  moves least; with too little data, and for convs and embeddings, it is ``mse``, and the pass
  record's ``gptq`` entry says which layers and why (:mod:`fxopt.quant.gptq`);
* ``activation``: ``uint8/tensor`` (static, calibrated; default), ``int8/token``
  (dynamic per-token, no calibration), ``none`` (weight-only);
  ``uint8/tensor/percentile`` or ``/mse`` choose the observer;
* ``embedding``: weight spec for embedding tables (``none`` keeps them fp32);
* ``ops``: which ops to quantize, from ``linear``, ``conv``, ``embedding``;
* ``skip``: module-path globs kept in float; ``overrides``: ``"GLOB=WEIGHT[;ACT]"``
  per-layer specs (``"encoder.layer.5.*=int8/channel;none"``; ``float`` skips);
* ``reduce_range``: ``auto`` (default) fits int8 linears and convs to what this CPU's
  int8 kernels sum exactly: 8-bit weights and activation codes where an engine can (VNNI,
  AMX), else 7-bit weights (-63..63), which on MiniLM cost less accuracy than 7-bit
  activations (see :mod:`fxopt.kernels.cpu_isa`). ``weights`` / ``activations`` force one
  side to 7 bits (``true`` is PyTorch's meaning, activations), ``none`` keeps 8 bits on
  both (on a saturating CPU the kernels then take an exact, slower path). The choice is in
  the specs of each layer's annotation and the pass record;
* ``budget``: a minimum output cosine similarity to the float model over the
  calibration data; the most quantization-sensitive layers are kept in float until it
  holds (the chosen layers are in the pass record). A user metric works too:
  ``compile(..., budget_metric=accuracy_fn, max_metric_drop=0.003)`` keeps layers in
  float until ``accuracy_fn(model)`` is within ``max_metric_drop`` of the float model's.

Static convolutions also quantize their output (after a ReLU that follows them), the
form fbgemm's int8 conv produces. One quantize/dequantize pair serves every consumer of
a tensor (the Q, K and V projections share theirs), so consumers agree on its scale, and
tensors joined by pass-through ops (reshape, permute, max-pool, slicing) or a
concatenation share one observer and one scale (:func:`fxopt.quant.plan.share_groups`): a value
quantized before such an op stays on the same integer grid after it.

A residual ``add`` of a quantized conv output and a tensor quantized for a layer (a ResNet
block's identity) can read that tensor's quantized form too (``residuals``; PyTorch's FX
quantization and NNCF quantize both inputs of such an add): a runtime given the graph then
fuses the add into the int8 conv instead of running it, its ReLU and the next quantization in
fp32 (``python bench/openvino_int8.py``: ResNet-50 8x224 on OpenVINO 170 -> 105 ms, NNCF's int8
101 ms). With it, a residual sum that no quantized layer reads (the last block's, before the pooling and
the head) is quantized after its ReLU (``residual_outputs`` in the record), as ONNX Runtime's and NNCF's
quantizers write it: the runtime runs that add in int8 too (ONNX Runtime's ``QLinearAdd``) instead of
changing layouts, adding and applying the ReLU in fp32. fxopt's own kernels pay a pass over each
identity for it, so ``residuals=auto`` (the default) turns it on when ``compile``'s ``runtime=``
is an ONNX runtime (or ``auto`` with one installed) and off for torch; ``true``/``false`` force it.

Static activation specs need calibration data: ``compile(..., calibration=batches)``;
``calibration_inputs=0`` picks inputs from ``(inputs, target)`` pairs,
``calibration_batches=N`` caps the number of batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import fxopt.quant.qops  # noqa: F401  (registers torch.ops.fxopt.quantize/dequantize)
from fxopt.errors import PipelineError
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.quant.plan import (QUANT_OPS, RANGES, collect_qparams, materialize, parse_spec, plan_targets,
                              range_name)
from fxopt.quant.qspec import QSpec
from fxopt.quant.gptq import collect_hessians
from fxopt.quant.sensitivity import (eval_batches, output_similarity, quantized_copy, run_outputs,
                                     sensitivity_scores, user_metric)

__all__ = ["InsertQDQPass"]

fxq = torch.ops.fxopt


def residuals_for(runtime: Any, candidates: Any = None) -> bool:
    """Quantize residual adds' identities (``residuals=auto``) for a graph an ONNX runtime may run.

    OpenVINO fuses the add into the int8 conv with them (``bench/openvino_int8.py``), while fxopt's
    own kernels pay one quantize-dequantize pass over each identity: on for onnxruntime / openvino,
    and for ``auto`` when one of its candidates is installed; off for torch and inductor.
    """
    if runtime in (None, "torch", "inductor"):
        return False
    if runtime != "auto":
        return True
    from fxopt.runtime.engines import list_runtimes
    from fxopt.runtime.select import AUTO_CANDIDATES
    names = list(candidates) if candidates is not None else list(AUTO_CANDIDATES)
    installed = list_runtimes()
    return any(n not in ("torch", "inductor") and installed.get(n, "missing") is None for n in names)


@register_pass
class InsertQDQPass(Pass):
    """Insert explicit quantize/dequantize nodes (simulated integer arithmetic); see the module docs."""

    name = "insert-qdq"
    reads_options = ("calibration_inputs", "calibration_batches", "group_size", "budget_metric", "max_metric_drop")
    preserves_semantics = False
    compresses = True

    def check_options(self, options: dict) -> None:
        from fxopt.errors import RecipeError
        group = options.get("group_size")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 2):
            raise RecipeError(f"group_size must be an integer >= 2 (how many consecutive weights of a row share "
                              f"one scale; 32, 64 or 128 are typical), got {group!r}")
        batches = options.get("calibration_batches")
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise RecipeError(f"calibration_batches must be a positive integer, got {batches!r}")
        drop = options.get("max_metric_drop")
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0):
            raise RecipeError(f"max_metric_drop must be a number >= 0, got {drop!r}")

    @dataclass(frozen=True)
    class Config:
        weight: str = "int8/channel"
        activation: Any = "uint8/tensor"
        embedding: Any = None
        ops: tuple = ("linear", "conv", "embedding")
        skip: tuple = ()
        overrides: tuple = ()
        budget: float = 0.0
        percentile: float = 99.99
        reduce_range: Any = "auto"
        residuals: Any = "auto"

        def __post_init__(self) -> None:
            object.__setattr__(self, "budget", float(self.budget))
            for f in ("ops", "skip", "overrides"):
                v = getattr(self, f)
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            bad = [o for o in self.ops if o not in QUANT_OPS]
            if bad:
                raise PipelineError(f"insert-qdq: unknown ops {bad}; choose from {sorted(QUANT_OPS)}")
            if range_name(self.reduce_range) not in RANGES:
                raise PipelineError(f"insert-qdq: reduce_range is one of {', '.join(RANGES)} (true means "
                                    f"activations, false none), got {self.reduce_range!r}")
            if self.residuals not in ("auto", True, False):
                raise PipelineError(f"insert-qdq: residuals is auto, true or false, got {self.residuals!r}")
            if not 0 <= self.budget < 1:
                raise PipelineError(f"insert-qdq: budget is a minimum cosine in [0, 1), got {self.budget}")
            parse_spec(self.weight), parse_spec(self.activation), parse_spec(self.embedding)
            a = parse_spec(self.activation)
            if a is not None and a.granularity not in ("tensor", "token"):
                raise PipelineError(f"insert-qdq: activations are quantized per tensor (static) or per token "
                                    f"(dynamic), got {a}")
            if a is not None and a.observer == "gptq":
                raise PipelineError("insert-qdq: gptq rounds weights (it needs a layer's weight and input "
                                    "Hessian); for activations use minmax, percentile or mse")
            if a is not None and a.dynamic and (a.bits not in (7, 8) or a.granularity != "token"):
                raise PipelineError("insert-qdq: dynamic activations are int8/token (or int7/token)")

    def _grouped(self, options: dict) -> Any:
        """The config with ``compile(..., group_size=G)`` applied to every group-wise spec."""
        config = self.config
        group = options.get("group_size")
        if group is None:
            return config
        self.check_options(options)
        swap = {f: str(dataclasses.replace(QSpec.parse(getattr(config, f)), group_size=int(group)))
                for f in ("weight", "embedding") if parse_spec(getattr(config, f)) is not None
                and QSpec.parse(getattr(config, f)).granularity == "group"}
        return dataclasses.replace(config, **swap) if swap else config

    def with_options(self, options: dict) -> "InsertQDQPass":
        config = self._grouped(options)  # group_size=32: the printed spec says group32
        # compile's runtime= decides; the printed config says so where it turns them on (without a
        # runtime, auto is off: the history's pipeline then reproduces the run either way)
        if config.residuals == "auto" and residuals_for(options.get("runtime"), options.get("runtime_candidates")):
            config = dataclasses.replace(config, residuals=True)
        return self if config == self.config else type(self)(config=config)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config = self._grouped(ctx.options)  # (a PassManager given the option directly)
        skipped: dict[str, list[str]] = {}
        targets = plan_targets(gm, config, skipped)
        if not targets:
            why = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in skipped.items())
            return PassResult(False, info={"quantized": 0, "why": why or f"no {'/'.join(config.ops)} layer "
                                           "with a floating-point weight in the graph"})
        residuals = self.config.residuals
        if residuals == "auto":  # (compile folds its runtime= in: see with_options)
            residuals = residuals_for(ctx.options.get("runtime"), ctx.options.get("runtime_candidates"))
        qparams = collect_qparams(gm, targets, ctx, self.config.percentile, residuals)
        info: dict[str, Any] = {}
        if self.config.budget > 0 or ctx.options.get("budget_metric") is not None:
            keep = self._budget(gm, targets, qparams, ctx, info, residuals)
            targets = [t for t in targets if t.label not in keep]
        hessians, gptq_info = collect_hessians(gm, targets, ctx)
        counts = materialize(gm, targets, qparams, residuals, hessians)
        info.update({"quantized": len(targets), **counts})
        if gptq_info:
            info["gptq"] = gptq_info
        if skipped:
            info["left_float"] = {k: v for k, v in skipped.items()}
        return PassResult(True, frozenset({"shapes"}), info)

    def _budget(self, gm, targets, qparams, ctx, info, residuals=False) -> set[str]:
        batches = eval_batches(ctx)
        ref = run_outputs(gm, batches)
        rows = sensitivity_scores(gm, targets, qparams, batches, ctx.options.get("progress"), ref)
        order = [r["layer"] for r in rows]
        metric = ctx.options.get("budget_metric")
        if metric is not None and not callable(metric):
            raise PipelineError("budget_metric must be a function of a module returning a number (accuracy)")
        drop = float(ctx.options.get("max_metric_drop", 0.0))
        floor = user_metric(metric, gm) - drop if metric is not None else None

        def ok(keep: set[str]) -> tuple[bool, float, float | None]:
            q = quantized_copy(gm, targets, keep, qparams, residuals)
            cos = output_similarity(ref, run_outputs(q, batches))["cosine"]
            if metric is None:
                return cos >= self.config.budget, cos, None
            value = user_metric(metric, q)
            return value >= floor and cos >= self.config.budget, cos, value
        keep: set[str] = set()
        good, cos, value = ok(keep)
        k = 0
        while not good and k < len(order):  # keep the worst layers in float, one more each time
            k += 1
            keep = set(order[:k])
            good, cos, value = ok(keep)
        info["kept_float"] = sorted(keep)
        info["budget_cosine"] = round(cos, 5)
        if metric is not None:
            info["budget_metric"] = {"float": round(floor + drop, 6), "quantized": value, "max_drop": drop}
        info["sensitivity"] = rows
        return keep

"""``fxopt.qat``: quantization-aware training on the QDQ graph of a quantization recipe.

    >>> import torch, fxopt
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> q = fxopt.qat(model, (x[:4],), data, recipe="int8-weight", epochs=2, lr=0.05, progress=False)
    >>> q.fxopt_history.qat["recipe"], len(q.fxopt_history.qat["epochs"])
    ('int8-weight', 2)

How it works, on the same graph post-training quantization builds:

1. The recipe runs up to and including ``insert-qdq`` (calibration as for PTQ: ``calibration=``,
   else the inputs of the first training batches), which writes the QDQ nodes.
2. Every ``dequantize(quantize(x))`` of an activation and every dequantized weight become a
   fake quantization with a straight-through estimator: the forward pass computes exactly the
   simulation's ``(clamp(round(x / s) + z) - z) * s``, the backward pass lets gradients through
   where ``x`` is inside the range and stops them where it is clamped. Weights train as float
   *latent* weights, initialized to the float weights the recipe quantized, except that a weight
   GPTQ rounded away from its nearest code (``int4-weight`` with enough calibration rows) starts at
   the nearest point that rounds to GPTQ's code: training starts from exactly the PTQ model
   (``history.qat["started_off_nearest"]`` counts them). ``learn_scales=True``
   also trains the scales (LSQ, Esser et al. 2020: the gradient of the rounding residual, scaled by
   ``1 / sqrt(n * qmax)``).
3. Observer ranges: weight scales are re-observed with the recipe's observer at the end of each of
   the first ``freeze_after`` epochs (the warm-up), then frozen; activation scales are the
   calibrated ones (trained with ``learn_scales``). Re-observing rounds every weight to its nearest
   code again, so where GPTQ's rounding was kept the default is no warm-up (measured, MiniLM
   ``int4-weight``, 2 epochs: held-out mean cosine 0.9884 with it, 0.9927 without).
4. The trained latent weights are quantized with the final scales into the QDQ graph's codes, and
   the rest of the recipe (``lower-quant`` and after) runs on it: the returned model runs exactly the
   kernels PTQ uses and equals its simulation to integer rounding (``lower-quant`` checks it).

Batch norms are folded into the convs by the recipe's ``fold-bn`` before the QDQ nodes exist, so QAT
trains the folded weights that are quantized; train with batch norm first (``fxopt.finetune`` of the
float or pruned model, as the recovery call does) to re-estimate its statistics.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from fxopt.errors import InputError, RecipeError
from fxopt.ir.torch_compat import torch_internals
import fxopt.quant.qops  # noqa: F401  (registers the fxopt:: QDQ ops)
fxq = torch.ops.fxopt
from fxopt.quant import qspec

__all__ = ["qat", "split_recipe", "fake_quantize"]

_EPS = torch.finfo(torch.float32).eps
CALIBRATION_BATCHES = 8         # training batches that calibrate, when no calibration= is given
GPTQ_CALIBRATION_BATCHES = 32   # ... when weights are rounded by GPTQ (>= 4 rows per input feature)


class _FakeQuant(torch.autograd.Function):
    """The simulation's ``dequantize(quantize(x))`` forward; straight-through (clipped) backward, LSQ scale grad."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax, group_size, learn):  # noqa: ANN001
        xf, s = x.float(), scale.float()
        z = zp.float()
        inv = 1.0 / s
        if group_size > 0:
            xg = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group_size, group_size)
            v, z, s_b = xg * inv.unsqueeze(-1), z.unsqueeze(-1), s.unsqueeze(-1)
        else:
            v, s_b = xf * inv, s
        r = torch.round(v) + z
        q = r.clamp(qmin, qmax)
        out = (q - z) * s_b
        inside = (r >= qmin) & (r <= qmax)
        ctx.save_for_backward(inside, v, q, z)
        ctx.meta = (group_size, learn, qmax, tuple(scale.shape), xf.shape)
        return out.reshape(xf.shape).to(x.dtype) if x.dtype != torch.float32 else out.reshape(xf.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        inside, v, q, z = ctx.saved_tensors
        group_size, learn, qmax, s_shape, x_shape = ctx.meta
        g = grad.float().reshape(v.shape)
        gx = (g * inside).reshape(x_shape)
        gs = None
        if learn and ctx.needs_input_grad[1]:
            d = torch.where(inside, torch.round(v) - v, q - z)  # d out / d scale
            per = g * d
            n = max(1, per.numel() // max(1, math.prod(s_shape)))  # elements per scale (a whole group)
            if group_size > 0:
                per = per.sum(-1)
            gs = per.sum_to_size(s_shape) if s_shape else per.sum()
            gs = gs / math.sqrt(n * qmax)
        return gx, gs, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  group_size: int = 0, learn: bool = False) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient (and LSQ's scale gradient if ``learn``)."""
    return _FakeQuant.apply(x, scale.clamp_min(_EPS) if learn else scale, zero_point, qmin, qmax, group_size, learn)


def _dynamic_scale(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """``fxopt.dynamic_scale`` without a custom op (no autograd formula needed: the scale is a constant)."""
    return x.detach().abs().amax(-1, keepdim=True).float().clamp_min(_EPS) / qmax


def _flat_steps(recipe: Any) -> list:
    """The steps of a recipe (a name, a pipeline string, a Pipeline) with aliases expanded."""
    from fxopt.passmgr.pipeline import Pipeline, PipelineAlias, as_pipeline
    from fxopt.passmgr.recipes import recipes
    pipeline = as_pipeline(recipes[recipe].pipeline) if isinstance(recipe, str) and recipe in recipes \
        else as_pipeline(recipe)
    out = []
    for s in pipeline.steps:
        if isinstance(s, PipelineAlias):
            out += _flat_steps(s.expand())
        elif isinstance(s, Pipeline):
            out += _flat_steps(s)
        else:
            out.append(s)
    return out


def split_recipe(recipe: Any) -> tuple[Any, Any, Any]:
    """``(before, insert_qdq, after)``: the recipe's steps around its ``insert-qdq`` pass."""
    from fxopt.passmgr.pipeline import Pipeline
    steps = _flat_steps(recipe)
    idx = [i for i, s in enumerate(steps) if getattr(s, "name", None) == "insert-qdq"]
    if len(idx) != 1:
        raise RecipeError(f"fxopt.qat needs a quantization recipe with one insert-qdq pass (int8, int8-dynamic, "
                          f"int8-weight, int4-weight, ...); '{recipe}' has {len(idx)}")
    i = idx[0]
    return Pipeline(steps[:i]), Pipeline([steps[i]]), Pipeline(steps[i + 1:])


def _spec_of(dq: fx.Node) -> Any:
    from fxopt.quant.annotation import QuantAnnotation
    for u in dq.users:
        a = QuantAnnotation.of(u)
        if a is not None:
            return a.weight
    return None


def _within_codes(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                  gs: int) -> tuple[torch.Tensor, int]:
    """``w``, with each weight whose nearest code is not the one the recipe chose (GPTQ rounds some
    weights away from their nearest code to cancel other weights' errors) moved to the nearest point
    that rounds to the chosen code; and how many moved. Training then starts from exactly the
    post-training-quantized model, and weights that round as chosen keep their float position."""
    off = qspec.quantize(w, scale, zp, qmin, qmax, gs) != codes
    n = int(off.sum())
    if not n:
        return w, 0
    c = codes.to(torch.int32)
    deq = qspec.dequantize(c, scale, zp, gs)
    step = (qspec.dequantize(c + 1, scale, zp, gs) - deq).abs()
    near = deq + torch.maximum(torch.minimum(w - deq, 0.4 * step), -0.4 * step)
    return torch.where(off, near, w), n


class _QatGraph:
    """The trainable copy of a QDQ graph, and how to write what it learned back."""

    def __init__(self, qdq: fx.GraphModule, floats: dict[str, torch.Tensor], learn_scales: bool,
                 frozen: frozenset = frozenset()):
        with torch_internals():
            self.gm = copy.deepcopy(qdq)
        gm, g = self.gm, self.gm.graph
        self.weights: list[dict] = []   # {"q": attr of the codes, "s", "z", "latent", "qmin", "qmax", "gs", "spec"}
        self.acts: list[dict] = []      # {"s": attr of a static scale, "param": trained scale attr}
        self.learn = learn_scales
        self.moved = 0   # latent weights moved into the code the recipe chose (GPTQ's rounding)
        done: dict[str, str] = {}
        for n in list(g.nodes):
            if n.op != "call_function" or n.target is not fxq.dequantize.default:
                continue
            src, s, z, gs = n.args
            if src.op == "get_attr":
                spec = _spec_of(n)
                if spec is None:
                    continue
                qname = src.target
                if qname not in done:
                    codes = getattr_path(gm, qname)
                    scale, zp = getattr_path(gm, s.target), getattr_path(gm, z.target)
                    init = floats.get(qname[:-2]) if qname.endswith("_q") else None
                    if init is None or init.shape != codes.shape:
                        init = qspec.dequantize(codes, scale, zp, gs)
                    else:
                        init, moved = _within_codes(init.float(), codes, scale, zp, spec.qmin, spec.qmax, gs)
                        self.moved += moved
                    latent = qname.replace(".", "_") + "_latent"
                    trains = not (qname.endswith("_q") and qname[:-2] in frozen)   # the user froze it: it stays
                    gm.register_parameter(latent, torch.nn.Parameter(init.detach().float().clone(), requires_grad=trains))
                    entry = {"q": qname, "s": s.target, "z": z.target, "latent": latent, "qmin": spec.qmin,
                             "qmax": spec.qmax, "gs": gs, "spec": spec, "scale_param": None}
                    if learn_scales:
                        entry["scale_param"] = latent + "_scale"
                        gm.register_parameter(entry["scale_param"], torch.nn.Parameter(scale.detach().float().clone(),
                                                                                       requires_grad=trains))
                    else:
                        entry["scale_buffer"] = latent + "_scale"
                        gm.register_buffer(entry["scale_buffer"], scale.detach().float().clone())
                    self.weights.append(entry)
                    done[qname] = latent
                entry = next(e for e in self.weights if e["q"] == qname)
                with g.inserting_before(n):
                    w = g.get_attr(entry["latent"])
                    sc = g.get_attr(entry["scale_param"] or entry["scale_buffer"])
                    fq = g.call_function(fake_quantize, (w, sc, z, entry["qmin"], entry["qmax"], gs, learn_scales))
                fq.meta = dict(n.meta)
                n.replace_all_uses_with(fq)
                g.erase_node(n)
            elif src.op == "call_function" and src.target is fxq.quantize.default:
                x, s2, z2, qmin, qmax, gs2 = src.args
                scale_node = s2
                learn = False
                if s2.op == "call_function" and s2.target is fxq.dynamic_scale.default:
                    with g.inserting_before(s2):
                        scale_node = g.call_function(_dynamic_scale, s2.args)
                    scale_node.meta = dict(s2.meta)
                elif s2.op == "get_attr" and learn_scales:
                    pname = s2.target.replace(".", "_") + "_qat"
                    if not hasattr(gm, pname):
                        gm.register_parameter(pname, torch.nn.Parameter(getattr_path(gm, s2.target).detach().float()
                                                                        .clone()))
                        self.acts.append({"s": s2.target, "param": pname})
                    with g.inserting_before(n):
                        scale_node = g.get_attr(pname)
                    learn = True
                with g.inserting_before(n):
                    fq = g.call_function(fake_quantize, (x, scale_node, z2, qmin, qmax, gs2, learn))
                fq.meta = dict(n.meta)
                n.replace_all_uses_with(fq)
                g.erase_node(n)
                for dead in (src, s2):
                    if dead.op == "call_function" and not dead.users:
                        g.erase_node(dead)
        gm.recompile()

    def reobserve(self) -> None:
        """Weight scales from the latent weights with the recipe's observer (the warm-up)."""
        from fxopt.quant.observers import weight_qparams
        with torch.no_grad():
            for e in self.weights:
                scale, zp = weight_qparams(getattr_path(self.gm, e["latent"]), e["spec"])
                zp_old = getattr_path(self.gm, e["z"])
                if scale.shape != getattr_path(self.gm, e["s"]).shape:
                    continue
                getattr_path(self.gm, e["scale_param"] or e["scale_buffer"]).copy_(scale)
                zp_old.copy_(zp.to(zp_old.dtype))

    def write_back(self, qdq: fx.GraphModule) -> dict:
        """Quantize the latent weights with the final scales into ``qdq``'s codes; copy learned scales."""
        changed = 0
        with torch.no_grad():
            for e in self.weights:
                w = getattr_path(self.gm, e["latent"]).detach().float()
                scale = getattr_path(self.gm, e["scale_param"] or e["scale_buffer"]).detach().float()
                if e["scale_param"]:
                    scale = scale.clamp_min(_EPS)
                zp = getattr_path(self.gm, e["z"])
                old = getattr_path(qdq, e["q"])
                codes = qspec.quantize(w, scale, zp, e["qmin"], e["qmax"], e["gs"]).to(old.dtype)
                changed += int((codes != old).sum())
                _set(qdq, e["q"], codes)
                _set(qdq, e["s"], scale.to(getattr_path(qdq, e["s"]).dtype))
                _set(qdq, e["z"], zp.detach().clone())
            for a in self.acts:
                old = getattr_path(qdq, a["s"])
                _set(qdq, a["s"], getattr_path(self.gm, a["param"]).detach().float().clamp_min(_EPS).to(old.dtype))
            # everything else that trained (biases, norms, float layers) goes back as it is
            own = {e["latent"] for e in self.weights} | {e["scale_param"] for e in self.weights} | \
                {a["param"] for a in self.acts}
            qdq_params = dict(qdq.named_parameters())
            for name, p in self.gm.named_parameters():
                if name not in own and name in qdq_params and qdq_params[name].shape == p.shape:
                    qdq_params[name].copy_(p.detach())
        return {"weights": len(self.weights), "learned_activation_scales": len(self.acts), "codes_changed": changed,
                "started_off_nearest": self.moved}


def _relative_error(a: Any, b: Any) -> float:
    """Largest |a - b| over the floating-point outputs, relative to the largest |b|."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            worst = max(worst, float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12)))
    return worst


def getattr_path(m: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        m = getattr(m, part)
    return m


def _set(m: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = getattr_path(m, owner) if owner else m
    if name in mod._buffers:
        mod._buffers[name] = value
    elif name in mod._parameters:
        mod._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        setattr(mod, name, value)


def _float_attrs(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.is_floating_point():
            out[name] = t.detach()
    # a graph's attributes live under their own names too ("stem_0_weight_bnfold")
    for name, t in vars(gm).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.setdefault(name, t.detach())
    return out


def _first_inputs(data: Iterable, n: int = 8) -> list:
    out = []
    for item in data:
        out.append(item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item)
        if len(out) >= n:
            break
    return out


def _rounds_by_gptq(insert: Any) -> bool:
    """Whether a recipe's ``insert-qdq`` step rounds some weights with GPTQ (which wants more calibration rows)."""
    cfg = getattr(_flat_steps(insert)[0], "config", None)
    specs = [getattr(cfg, "weight", None) or "", *(getattr(cfg, "overrides", ()) or ())]
    return any("gptq" in str(x) for x in specs)


def qat(model: torch.nn.Module, args: Any = (), data: Iterable | None = None, *, kwargs: dict | None = None,
        recipe: str = "int8", epochs: int = 2, calibration: Iterable | None = None, learn_scales: bool = False,
        freeze_after: int | None = None, lr: float = 0.005, metric: Callable | None = None,
        progress: bool | None = None, compile_options: dict | None = None,
        **finetune_options: Any) -> fx.GraphModule:
    """Quantization-aware training of ``model`` for ``recipe``; returns the lowered model, like
    ``fxopt.compile(model, args, recipe=recipe)`` but trained with its quantization in the loop.

    ``data``: the training batches (as for :func:`fxopt.finetune`; distillation options such as
    ``teacher=``/``distill=`` work here too: the teacher defaults to ``model``). ``epochs``,
    ``lr`` (default 0.005: QAT starts from a trained model) and the other options go to
    :func:`fxopt.finetune`. ``calibration``: inputs for the static activation ranges (default: the
    first 8 training batches' inputs; 32 when the recipe rounds weights with GPTQ, which needs at least
    4 rows per input feature). ``learn_scales``: train the scales too (LSQ).
    ``freeze_after``: epochs during which weight ranges are re-observed (default ``epochs // 2``; 0
    when weights start from GPTQ's rounding, which re-observing would undo).
    ``compile_options``: options of the recipe's passes (``smoothquant=``, ``group_size=``...).
    ``model`` is never changed. ``result.fxopt_history.qat`` has the per-epoch records and the
    number of weight codes training changed. See the module docstring.
    """
    import fxopt  # the public API at call time (fxopt.api sits above this module)
    from fxopt.train.training import finetune
    fxopt_compile = fxopt.compile
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxopt.qat expects a torch.nn.Module, got {type(model).__name__}")
    if data is None:
        raise InputError("fxopt.qat needs training data: qat(model, args, data=[(inputs, targets), ...])")
    if hasattr(data, "__len__") and len(data) == 0:  # type: ignore[arg-type]
        raise InputError("the training data is empty")
    if iter(data) is data:  # type: ignore[call-overload]
        raise InputError("fxopt.qat's data is a one-shot iterator; pass a list or a DataLoader (it is read for "
                         "calibration and again for training)")
    before, insert, after = split_recipe(recipe)
    options = dict(compile_options or {})
    calib = list(calibration) if calibration is not None else \
        _first_inputs(data, GPTQ_CALIBRATION_BATCHES if _rounds_by_gptq(insert) else CALIBRATION_BATCHES)
    if not calib:
        raise InputError("the training data is empty")
    if isinstance(args, torch.Tensor):
        args = (args,)
    quiet = {"progress": False}
    import warnings

    def stage(m: Any, recipe_part: Any, **extra: Any) -> Any:
        with warnings.catch_warnings():  # each part reads only some of the recipe's options
            warnings.filterwarnings("ignore", message=".*are not read by any pass")
            return fxopt_compile(m, args, kwargs, recipe=recipe_part, calibration=calib, **quiet, **options, **extra)
    floats_gm = stage(model, before) if len(before) else model
    qdq = stage(floats_gm, insert)
    floats = _float_attrs(floats_gm)
    frozen = frozenset(n for n, p in floats_gm.named_parameters() if not p.requires_grad)
    train = _QatGraph(qdq, floats, learn_scales, frozen)
    if not train.weights:
        raise RecipeError(f"recipe '{recipe}' quantized no weight of this model: nothing to train")
    # re-observing re-rounds every weight to its nearest code: with GPTQ's rounding kept, it is not done by default
    freeze = (0 if train.moved else epochs // 2) if freeze_after is None else int(freeze_after)
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 0
    user_hook = finetune_options.pop("on_step", None)

    def hook(step: int, m: torch.nn.Module) -> None:
        if steps_per_epoch and step % steps_per_epoch == 0 and step // steps_per_epoch <= freeze \
                and step // steps_per_epoch < epochs:
            train.reobserve()
        if user_hook is not None:
            user_hook(step, m)
    if finetune_options.get("distill") and finetune_options.get("teacher") is None:
        finetune_options["teacher"] = model
    trained, history = finetune(train.gm, data, epochs=epochs, lr=lr, inplace=True, progress=progress,
                                on_step=hook, **finetune_options)
    info = train.write_back(qdq)
    out = stage(qdq, after, metric=metric) if len(after) else qdq
    # the lowered model against the trained simulation (the fake-quantized training graph), on the example
    from fxopt.ir.graph_utils import preserved_state
    train.gm.eval()
    with torch.no_grad(), preserved_state(out), preserved_state(train.gm):
        info["simulation_error"] = _relative_error(out(*args, **(kwargs or {})), train.gm(*args, **(kwargs or {})))
    hist = out.fxopt_history
    # one history for the whole run: the passes before and after training, in order
    first = floats_gm if floats_gm is not model else qdq
    earlier = floats_gm.fxopt_history.records if floats_gm is not model else []
    hist.records = [*earlier, *qdq.fxopt_history.records, *hist.records]
    hist.initial, hist.initial_stats = first.fxopt_history.initial, first.fxopt_history.initial_stats
    hist.pipeline = str(before + insert + after)
    for i, r in enumerate(hist.records, 1):
        r.index = i
    stage = {"stage": "qat", "what": f"{insert}, {epochs} epochs" + (", learned scales" if learn_scales else ""),
             "epochs": history.epochs, "steps": history.steps, "learn_scales": learn_scales,
             "freeze_after": freeze, "seconds": sum(e.get("seconds", 0.0) for e in history.epochs), **info}
    if hist.metric is not None:
        stage["metric"] = hist.metric["compiled"]
    stage["params"] = hist.final_stats.get("params")
    stage["bytes"] = hist.final_stats.get("model_bytes")
    hist.stages.append(stage)
    hist.qat = stage
    import weakref
    out.meta["fxopt_source"] = weakref.ref(model)
    return out

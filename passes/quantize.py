"""``insert-qdq``: explicit quantize/dequantize nodes around linears, convs and embeddings.

The pass turns ``linear(x, W, b)`` into::

    q  = fxopt.quantize(x, s_x, z_x, 0, 255)          # activation (static: calibrated s_x, z_x)
    xd = fxopt.dequantize(q, s_x, z_x)
    wd = fxopt.dequantize(W_int8, s_W, z_W)            # weight stored as int8, scale per channel
    y  = linear(xd, wd, b)

so the graph *simulates* integer arithmetic exactly in float, can be inspected, and
``lower-quant`` can swap each pattern for a real integer kernel. Weights are quantized
right away (their int8 tensors replace the fp32 ones, so model bytes already drop).

Config (all strings are :class:`~fxopt.qspec.QSpec` text):

* ``weight``: ``int8/channel`` (default), ``int4/group128``, ``int8/channel/mse`` ...
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
  the specs of the QDQ nodes and the pass record;
* ``budget``: a minimum output cosine similarity to the float model over the
  calibration data; the most quantization-sensitive layers are kept in float until it
  holds (the chosen layers are in the pass record). A user metric works too:
  ``compile(..., budget_metric=accuracy_fn, max_metric_drop=0.003)`` keeps layers in
  float until ``accuracy_fn(model)`` is within ``max_metric_drop`` of the float model's.

Static convolutions also quantize their output (after a ReLU that follows them), the
form fbgemm's int8 conv produces. One quantize/dequantize pair serves every consumer of
a tensor (the Q, K and V projections share theirs), so consumers agree on its scale, and
tensors joined by pass-through ops (reshape, permute, max-pool, slicing) or a
concatenation share one observer and one scale (:func:`share_groups`): a value
quantized before such an op stays on the same integer grid after it.

Static activation specs need calibration data: ``compile(..., calibration=batches)``;
``calibration_inputs=0`` picks inputs from ``(inputs, target)`` pairs,
``calibration_batches=N`` caps the number of batches.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import fxopt.qops  # noqa: F401  (registers torch.ops.fxopt.quantize/dequantize)
from fxopt.calibrate import iter_calibration, observe
from fxopt.dialect import aten, module_path
from fxopt.errors import CalibrationError, PipelineError
from fxopt.meta import propagate_meta
from fxopt.observers import make_observer, weight_qparams
from fxopt.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.qspec import QSpec
from fxopt.qspec import quantize as quantize_tensor
from fxopt.rewrite_utils import attr_tensor, copy_meta, erase_dead
from fxopt.kernels import cpu_isa
from fxopt.torch_compat import torch_internals

__all__ = ["InsertQDQPass", "QuantTarget", "plan_targets", "materialize", "collect_qparams", "share_groups",
           "output_similarity", "sensitivity_scores"]

fxq = torch.ops.fxopt
_OPS = {"linear": {aten.linear.default}, "conv": {aten.conv2d.default}, "embedding": {aten.embedding.default}}
_RELU = {aten.relu.default, aten.relu_.default}


def _spec(text: Any) -> QSpec | None:
    if text is None or str(text).lower() in ("none", "float", ""):
        return None
    return QSpec.parse(text)


@dataclass
class QuantTarget:
    node: fx.Node
    kind: str
    path: str
    weight: QSpec
    activation: QSpec | None

    @property
    def label(self) -> str:
        return self.path or self.node.name


def _weight_node(t_node: fx.Node, kind: str) -> Any:
    return t_node.args[0] if kind == "embedding" else t_node.args[1]


def plan_targets(gm: fx.GraphModule, config: Any, skipped: dict | None = None) -> list[QuantTarget]:
    """Which nodes get quantized, with which specs (after skip/overrides).

    ``skipped`` (if given) collects, per reason, the layers left in float for a reason the
    user may not expect (a group size that does not divide the layer, a non-float32 input).
    """
    skipped = {} if skipped is None else skipped
    wspec, aspec, espec = _spec(config.weight), _spec(config.activation), _spec(config.embedding)
    overrides = []
    for o in config.overrides:
        glob, eq, rest = str(o).partition("=")
        if not eq:
            raise PipelineError(f"insert-qdq: override {o!r} must read 'GLOB=WEIGHT[;ACTIVATION]'")
        w, _, a = rest.partition(";")
        overrides.append((glob.strip(), _spec(w), _spec(a) if a else aspec, not a))
    out = []
    for node in gm.graph.nodes:
        kind = next((k for k in config.ops if node.op == "call_function" and node.target in _OPS[k]), None)
        if kind is None:
            continue
        path = module_path(node)
        if any(fnmatch.fnmatchcase(path, g) for g in config.skip):
            continue
        w_node = _weight_node(node, kind)
        w = attr_tensor(gm, w_node)
        if w is None or not w.is_floating_point():
            continue
        ws, a = (espec, None) if kind == "embedding" else (wspec, aspec)
        for glob, ow, oa, _ in overrides:
            if fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(node.name, glob):
                ws = ow
                a = None if kind == "embedding" else oa
        if ws is None:
            continue
        if kind == "conv":
            if ws.granularity == "group":  # conv kernels are tiny along the last dim: use per channel
                ws = QSpec(bits=ws.bits, signed=ws.signed, symmetric=ws.symmetric, granularity="channel",
                           observer=ws.observer)
            if a is not None and a.dynamic:
                a = None  # no dynamic int8 conv kernel: weight-only
        if ws.granularity == "group" and w.shape[-1] % ws.group_size:
            # the input dim does not split into groups: leave the layer in float
            skipped.setdefault(f"input size not a multiple of group size {ws.group_size}", []).append(
                f"{path or node.name} ({w.shape[-1]})")
            continue
        if kind != "embedding" and a is not None and isinstance(node.args[0], fx.Node):
            v = node.args[0].meta.get("val")
            if isinstance(v, torch.Tensor) and v.dtype != torch.float32:
                a = None
        out.append(QuantTarget(node, kind, path, ws, a))
    return _fit_int8_plan(gm, out, getattr(config, "reduce_range", "none"))


def int8_kernel_target(t: QuantTarget) -> bool:
    """Will ``lower-quant`` run this target on an int8 x int8 kernel (int8 symmetric per-channel weights)?"""
    w, a = t.weight, t.activation
    return (t.kind in ("linear", "conv") and a is not None and w.bits >= 7 and w.signed and w.symmetric
            and w.granularity == "channel")


_RANGES = {"auto": None, "none": (8, 8), "weights": (8, 7), "activations": (7, 8)}


def _probe_shape(gm: fx.GraphModule, t: QuantTarget) -> tuple[str, tuple]:
    w = attr_tensor(gm, _weight_node(t.node, t.kind))
    if t.kind == "linear":
        return "linear", tuple(w.shape)
    a = list(t.node.args) + [None] * 7
    pick = lambda i, name, d: a[i] if a[i] is not None else t.node.kwargs.get(name, d)  # noqa: E731
    padding = pick(4, "padding", 0)
    if isinstance(padding, str):
        padding = 0  # 'same'/'valid' convs are not lowered; any probe shape will do
    return "conv", cpu_isa.conv_shape(w.shape, pick(3, "stride", 1), padding, pick(5, "dilation", 1),
                                      pick(6, "groups", 1))


def int8_bits_for(gm: fx.GraphModule, t: QuantTarget, reduce_range: Any) -> tuple[int, int]:
    """(activation bits, weight bits) of an int8-kernel target under ``reduce_range``."""
    fixed = _RANGES.get(_range_name(reduce_range))
    if fixed is not None:
        return fixed
    return cpu_isa.int8_plan(*_probe_shape(gm, t))


def _range_name(value: Any) -> str:
    """``reduce_range``: True is PyTorch's meaning (7-bit activations), False none."""
    if value is None:
        return "none"
    return {True: "activations", False: "none"}.get(value, value) if isinstance(value, bool) else str(value)


def _isa_label() -> str:
    force = cpu_isa.forced_isa()
    return f"{force} (forced)" if force else cpu_isa.cpu_info(probe=False).isa


def _fit_int8_plan(gm: fx.GraphModule, targets: list[QuantTarget], reduce_range: Any) -> list[QuantTarget]:
    """Narrow int8-kernel targets to the code widths the CPU plan needs (7-bit weights or activations).

    All consumers of one tensor share its quantize node, so they get the narrowest activation
    width any of them needs.
    """
    act: dict[Any, int] = {}
    plans = {}
    for t in targets:
        if int8_kernel_target(t) and isinstance(t.node.args[0], fx.Node):
            plans[id(t)] = a_bits, w_bits = int8_bits_for(gm, t, reduce_range)
            act[t.node.args[0]] = min(act.get(t.node.args[0], 8), a_bits)
    for t in targets:
        if id(t) not in plans:
            continue
        x = t.node.args[0]
        if t.activation is not None and act.get(x, 8) < t.activation.bits:
            t.activation = dataclasses.replace(t.activation, bits=act[x])
        if plans[id(t)][1] < t.weight.bits:
            t.weight = dataclasses.replace(t.weight, bits=plans[id(t)][1])
    return targets


def _output_node(t: QuantTarget) -> fx.Node:
    """A static conv's quantized output: after its ReLU when the ReLU is its only user."""
    users = list(t.node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _RELU:
        return users[0]
    return t.node


def output_spec(t: QuantTarget) -> QSpec:
    """A static conv's output grid: unsigned, as wide as its input codes (the next int8 layer reads it)."""
    a = t.activation
    return QSpec(bits=min(a.bits, 8) if a is not None else 8, signed=False, symmetric=False,
                 observer=a.observer if a is not None else "minmax")


def _needs_output(t: QuantTarget) -> bool:
    return t.kind == "conv" and t.activation is not None and not t.activation.dynamic


def _observed(targets: list[QuantTarget]) -> dict[fx.Node, QSpec]:
    watch: dict[fx.Node, QSpec] = {}
    for t in targets:
        if t.activation is not None and not t.activation.dynamic and isinstance(t.node.args[0], fx.Node):
            watch.setdefault(t.node.args[0], t.activation)
            if _needs_output(t):
                watch.setdefault(_output_node(t), output_spec(t))
    return watch


#: ops whose output values are a subset of their input values: a quantization grid passes through them
_SHARE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
          aten.transpose.int, aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims,
          aten.unsqueeze.default, aten.clone.default, aten.contiguous.default, aten.max_pool2d.default,
          aten.max_pool1d.default, aten.cat.default, aten.slice.Tensor, aten.select.int}


def share_groups(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """node -> representative: tensors that must share quantization parameters.

    The output of a pass-through op (reshape, permute, max-pool, slicing ...) and its
    input, and a concatenation and all of its inputs, form one group, so a value
    quantized before such an op stays on the same integer grid after it.
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            parent[n] = parent.get(parent[n], parent[n])
            n = parent[n]
        return n
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _SHARE:
            continue
        ins = n.args[0] if n.target is aten.cat.default else [n.args[0]]
        for a in ins:
            v = a.meta.get("val") if isinstance(a, fx.Node) else None
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                ra, rn = find(a), find(n)
                if ra is not rn:
                    parent[rn] = ra
    return {n: find(n) for n in list(parent)}


def collect_qparams(gm: fx.GraphModule, targets: list[QuantTarget], ctx: PassContext,
                    percentile: float = 99.99) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrate the static activations the targets need; node name -> (scale, zero_point).

    Tensors in one :func:`share_groups` group get one observer, fed by every watched
    member, and the same parameters.
    """
    watch = _observed(targets)
    if not watch:
        return {}
    if ctx.calibration is None:
        raise CalibrationError("static activation quantization needs calibration data: "
                               "fxopt.compile(model, args, recipe=..., calibration=batches) (or `fxopt compile "
                               "--calibration FILE`); or use a dynamic or weight-only recipe "
                               "(int8-dynamic, int8-weight, int4-weight)")
    groups = share_groups(gm)
    by_root: dict[fx.Node, Any] = {}
    observers = {}
    for n, s in watch.items():
        root = groups.get(n, n)
        if root not in by_root:
            by_root[root] = make_observer(s, **({"percentile": percentile} if s.observer == "percentile" else {}))
        observers[n] = by_root[root]
    observe(gm, observers, ctx.calibration, inputs=ctx.options.get("calibration_inputs"),
            example=(ctx.args, ctx.kwargs), max_batches=ctx.options.get("calibration_batches"),
            progress=ctx.options.get("progress"))
    params = {id(o): o.qparams() for o in by_root.values()}
    return {n.name: params[id(o)] for n, o in observers.items()}


# ---------------------------------------------------------------- materialize
def _buffer(gm: fx.GraphModule, owner: str, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    mod = gm.get_submodule(owner) if owner else gm
    base, i = name, 1
    while hasattr(mod, name):
        name, i = f"{base}_{i}", i + 1
    mod.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{owner}.{name}" if owner else name)


def materialize(gm: fx.GraphModule, targets: list[QuantTarget],
                qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """Write the QDQ nodes for ``targets`` into ``gm`` (which must hold the targets' nodes)."""
    counts = {"weights": 0, "activations": 0, "dynamic": 0, "outputs": 0}
    weights: dict[tuple, tuple] = {}
    acts: dict[fx.Node, fx.Node] = {}
    g = gm.graph
    for t in targets:
        node = t.node
        w_node = _weight_node(node, t.kind)
        key = (str(w_node.target), str(t.weight))
        if key not in weights:
            w = attr_tensor(gm, w_node)
            scale, zp = weight_qparams(w, t.weight)
            gs = t.weight.group_size if t.weight.granularity == "group" else 0
            q = quantize_tensor(w.detach().float(), scale, zp, t.weight.qmin, t.weight.qmax, gs)
            if -128 <= t.weight.qmin and t.weight.qmax <= 127:
                zp = zp.to(torch.int8)  # one byte per zero point (a group of 128 int4 weights is 64 bytes)
            owner, _, attr = str(w_node.target).rpartition(".")
            anchor = w_node
            nodes = (_buffer(gm, owner, f"{attr}_q", q, anchor), _buffer(gm, owner, f"{attr}_scale", scale, anchor),
                     _buffer(gm, owner, f"{attr}_zp", zp, anchor))
            weights[key] = (nodes, gs)
            counts["weights"] += 1
        (qn, sn, zn), gs = weights[key]
        with g.inserting_before(node):
            wd = g.call_function(fxq.dequantize.default, (qn, sn, zn, gs))
        copy_meta(wd, node)
        node.replace_input_with(w_node, wd)
        node.meta["fxopt_quant"] = {"weight": str(t.weight), "activation": str(t.activation) if t.activation else None}
        if int8_kernel_target(t):
            node.meta["fxopt_quant"]["isa"] = _isa_label()
        if t.activation is None or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        if x.target is fxq.dequantize.default:  # already quantized (a static conv's output): share it
            acts[x] = x
        if x not in acts:
            a = t.activation
            anchor = min(x.users)  # fx nodes compare by graph position
            if a.dynamic:
                with g.inserting_before(anchor):
                    s = g.call_function(fxq.dynamic_scale.default, (x, a.qmax))
                z = _buffer(gm, "", f"{x.name}_zp", torch.zeros((), dtype=torch.int32), anchor)
                counts["dynamic"] += 1
            else:
                scale, zp = qparams[x.name]
                s = _buffer(gm, "", f"{x.name}_scale", scale, anchor)
                z = _buffer(gm, "", f"{x.name}_zp", zp, anchor)
                counts["activations"] += 1
            with g.inserting_before(anchor):
                q = g.call_function(fxq.quantize.default, (x, s, z, a.qmin, a.qmax, 0))
                acts[x] = g.call_function(fxq.dequantize.default, (q, s, z, 0))
            for n in (s, q, acts[x]):
                copy_meta(n, node)
        node.replace_input_with(x, acts[x])
        if _needs_output(t):
            out = _output_node(t)
            scale, zp = qparams[out.name]
            users = list(out.users)
            nxt = out.next
            s = _buffer(gm, "", f"{out.name}_scale", scale, nxt)
            z = _buffer(gm, "", f"{out.name}_zp", zp, nxt)
            with g.inserting_before(nxt):
                o = output_spec(t)
                q = g.call_function(fxq.quantize.default, (out, s, z, o.qmin, o.qmax, 0))
                dq = g.call_function(fxq.dequantize.default, (q, s, z, 0))
            for n in (q, dq):
                copy_meta(n, node)
            for u in users:
                u.replace_input_with(out, dq)
            counts["outputs"] += 1
    erase_dead(gm)
    propagate_meta(gm)
    return counts


# ---------------------------------------------------------------- sensitivity
def _flat_outputs(out: Any) -> torch.Tensor:
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


def _eval_batches(ctx: PassContext, limit: int = 4) -> list[tuple[tuple, dict]]:
    batches = [(ctx.args, ctx.kwargs)]
    if ctx.calibration is not None:
        for i, a, k in iter_calibration(ctx.calibration, inputs=ctx.options.get("calibration_inputs"),
                                        example=(ctx.args, ctx.kwargs), max_batches=limit, progress=False):
            batches.append((a, k))
    return batches


def _run(gm: fx.GraphModule, batches: list) -> list[torch.Tensor]:
    from fxopt.graph_utils import preserved_state
    with torch.no_grad(), preserved_state(gm):
        return [_flat_outputs(gm(*a, **k)) for a, k in batches]


def _quantized_copy(gm: fx.GraphModule, targets: list[QuantTarget], keep: set[str],
                    qparams: dict) -> fx.GraphModule:
    """A deep copy of ``gm`` with ``targets`` quantized except the layers labelled in ``keep``."""
    memo: dict = {}
    with torch_internals():
        dup = copy.deepcopy(gm, memo)
    by_name = {n.name: n for n in dup.graph.nodes}
    sub = [QuantTarget(by_name[t.node.name], t.kind, t.path, t.weight, t.activation)
           for t in targets if t.label not in keep]
    materialize(dup, sub, qparams)
    dup.recompile()
    return dup


def sensitivity_scores(gm: fx.GraphModule, targets: list[QuantTarget], qparams: dict,
                       batches: list, progress: bool | None = None, ref: list | None = None) -> list[dict]:
    """Per layer: output cosine and SQNR when only that layer is quantized, worst first."""
    from tqdm.auto import tqdm
    ref = _run(gm, batches) if ref is None else ref
    labels = list(dict.fromkeys(t.label for t in targets))
    rows = []
    for label in tqdm(labels, desc="fxopt: sensitivity", disable=not progress, leave=False):
        only = [t for t in targets if t.label == label]
        q = _quantized_copy(gm, only, set(), qparams)
        sim = output_similarity(ref, _run(q, batches))
        rows.append({"layer": label, "op": only[0].kind, "weight": str(only[0].weight),
                     "activation": str(only[0].activation) if only[0].activation else "-", **sim})
    rows.sort(key=lambda r: (r["cosine"], r["sqnr"]))  # the budget is a cosine: its worst layers first
    return rows


def _metric(fn: Any, module: fx.GraphModule) -> float:
    from fxopt.errors import mark_user_error
    from fxopt.graph_utils import preserved_state
    with torch.no_grad(), preserved_state(module):
        try:
            value = fn(module)
        except Exception as e:  # the user's metric failed: theirs to see, not a pass bug
            raise mark_user_error(e)
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"budget_metric must return a number (an accuracy), got {type(value).__name__}") from e


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

        def __post_init__(self) -> None:
            object.__setattr__(self, "budget", float(self.budget))
            for f in ("ops", "skip", "overrides"):
                v = getattr(self, f)
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            bad = [o for o in self.ops if o not in _OPS]
            if bad:
                raise PipelineError(f"insert-qdq: unknown ops {bad}; choose from {sorted(_OPS)}")
            if _range_name(self.reduce_range) not in _RANGES:
                raise PipelineError(f"insert-qdq: reduce_range is one of {', '.join(_RANGES)} (true means "
                                    f"activations, false none), got {self.reduce_range!r}")
            if not 0 <= self.budget < 1:
                raise PipelineError(f"insert-qdq: budget is a minimum cosine in [0, 1), got {self.budget}")
            _spec(self.weight), _spec(self.activation), _spec(self.embedding)
            a = _spec(self.activation)
            if a is not None and a.granularity not in ("tensor", "token"):
                raise PipelineError(f"insert-qdq: activations are quantized per tensor (static) or per token "
                                    f"(dynamic), got {a}")
            if a is not None and a.dynamic and (a.bits not in (7, 8) or a.granularity != "token"):
                raise PipelineError("insert-qdq: dynamic activations are int8/token (or int7/token)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config = self.config
        group = ctx.options.get("group_size")
        if group is not None:  # compile(..., group_size=64) sets the group of every group-wise spec
            self.check_options(ctx.options)
            swap = {f: str(dataclasses.replace(QSpec.parse(getattr(config, f)), group_size=int(group)))
                    for f in ("weight", "embedding") if _spec(getattr(config, f)) is not None
                    and QSpec.parse(getattr(config, f)).granularity == "group"}
            config = dataclasses.replace(config, **swap)
        skipped: dict[str, list[str]] = {}
        targets = plan_targets(gm, config, skipped)
        if not targets:
            why = "; ".join(f"{k}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in skipped.items())
            return PassResult(False, info={"quantized": 0, "why": why or f"no {'/'.join(config.ops)} layer "
                                           "with a floating-point weight in the graph"})
        qparams = collect_qparams(gm, targets, ctx, self.config.percentile)
        info: dict[str, Any] = {}
        if self.config.budget > 0 or ctx.options.get("budget_metric") is not None:
            keep = self._budget(gm, targets, qparams, ctx, info)
            targets = [t for t in targets if t.label not in keep]
        counts = materialize(gm, targets, qparams)
        info.update({"quantized": len(targets), **counts})
        if skipped:
            info["left_float"] = {k: v for k, v in skipped.items()}
        return PassResult(True, frozenset({"shapes"}), info)

    def _budget(self, gm, targets, qparams, ctx, info) -> set[str]:
        batches = _eval_batches(ctx)
        ref = _run(gm, batches)
        rows = sensitivity_scores(gm, targets, qparams, batches, ctx.options.get("progress"), ref)
        order = [r["layer"] for r in rows]
        metric = ctx.options.get("budget_metric")
        if metric is not None and not callable(metric):
            raise PipelineError("budget_metric must be a function of a module returning a number (accuracy)")
        drop = float(ctx.options.get("max_metric_drop", 0.0))
        floor = _metric(metric, gm) - drop if metric is not None else None

        def ok(keep: set[str]) -> tuple[bool, float, float | None]:
            q = _quantized_copy(gm, targets, keep, qparams)
            cos = output_similarity(ref, _run(q, batches))["cosine"]
            if metric is None:
                return cos >= self.config.budget, cos, None
            value = _metric(metric, q)
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

"""Quantization planning, shared by ``insert-qdq`` and :func:`fxopt.sensitivity`: which layers get
which spec (:func:`plan_targets`), the ISA-aware int8 code widths (:func:`int8_bits_for`), the
observers' parameters on calibration data (:func:`collect_qparams`) and writing the QDQ nodes,
the integer weights and each layer's :class:`~fxopt.quant.annotation.QuantAnnotation` into the
graph (:func:`materialize`). See :mod:`fxopt.passes.quant.quantize`
for what the pass does with them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import fxopt.quant.qops  # noqa: F401  (registers torch.ops.fxopt.quantize/dequantize)
from fxopt.quant.calibrate import observe
from fxopt.ir.dialect import RELU_OPS, aten, module_path
from fxopt.errors import CalibrationError, PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.quant.gptq import gptq_quantize
from fxopt.quant.observers import make_observer, weight_qparams
from fxopt.passmgr.pass_base import PassContext
from fxopt.quant.annotation import QuantAnnotation
from fxopt.quant.qspec import QSpec
from fxopt.quant.qspec import quantize as quantize_tensor
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead
from fxopt.kernels import cpu_isa

__all__ = ["QUANT_OPS", "parse_spec", "QuantTarget", "plan_targets", "int8_kernel_target", "int8_bits_for", "fit_int8_plan", "range_name",
           "isa_label", "RANGES", "output_spec", "share_groups", "collect_qparams", "materialize"]

fxq = torch.ops.fxopt
QUANT_OPS = {"linear": {aten.linear.default}, "conv": {aten.conv2d.default}, "embedding": {aten.embedding.default}}


def parse_spec(text: Any) -> QSpec | None:
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

    @property
    def weight_node(self) -> Any:
        """The graph node that reads this layer's weight."""
        return _weight_node(self.node, self.kind)


def _weight_node(t_node: fx.Node, kind: str) -> Any:
    return t_node.args[0] if kind == "embedding" else t_node.args[1]


def plan_targets(gm: fx.GraphModule, config: Any, skipped: dict | None = None) -> list[QuantTarget]:
    """Which nodes get quantized, with which specs (after skip/overrides).

    ``skipped`` (if given) collects, per reason, the layers left in float for a reason the
    user may not expect (a group size that does not divide the layer, a non-float32 input).
    """
    skipped = {} if skipped is None else skipped
    wspec, aspec, espec = parse_spec(config.weight), parse_spec(config.activation), parse_spec(config.embedding)
    overrides = []
    for o in config.overrides:
        glob, eq, rest = str(o).partition("=")
        if not eq:
            raise PipelineError(f"insert-qdq: override {o!r} must read 'GLOB=WEIGHT[;ACTIVATION]'")
        w, _, a = rest.partition(";")
        overrides.append((glob.strip(), parse_spec(w), parse_spec(a) if a else aspec, not a))
    out = []
    for node in gm.graph.nodes:
        kind = next((k for k in config.ops if node.op == "call_function" and node.target in QUANT_OPS[k]), None)
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
    return fit_int8_plan(gm, out, getattr(config, "reduce_range", "none"))


def int8_kernel_target(t: QuantTarget) -> bool:
    """Will ``lower-quant`` run this target on an int8 x int8 kernel (int8 symmetric per-channel weights)?"""
    w, a = t.weight, t.activation
    return (t.kind in ("linear", "conv") and a is not None and w.bits >= 7 and w.signed and w.symmetric
            and w.granularity == "channel")


RANGES = {"auto": None, "none": (8, 8), "weights": (8, 7), "activations": (7, 8)}


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
    fixed = RANGES.get(range_name(reduce_range))
    if fixed is not None:
        return fixed
    return cpu_isa.int8_plan(*_probe_shape(gm, t))


def range_name(value: Any) -> str:
    """``reduce_range``: True is PyTorch's meaning (7-bit activations), False none."""
    if value is None:
        return "none"
    return {True: "activations", False: "none"}.get(value, value) if isinstance(value, bool) else str(value)


def isa_label() -> str:
    force = cpu_isa.forced_isa()
    return f"{force} (forced)" if force else cpu_isa.cpu_info(probe=False).isa


def fit_int8_plan(gm: fx.GraphModule, targets: list[QuantTarget], reduce_range: Any) -> list[QuantTarget]:
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


def _after_relu(n: fx.Node) -> fx.Node:
    """``n``'s value as the next op reads it: after its ReLU when the ReLU is its only user."""
    users = list(n.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in RELU_OPS:
        return users[0]
    return n


def _output_node(t: QuantTarget) -> fx.Node:
    """A static conv's quantized output: after its ReLU when the ReLU is its only user."""
    return _after_relu(t.node)


def output_spec(t: QuantTarget) -> QSpec:
    """A static conv's output grid: unsigned, as wide as its input codes (the next int8 layer reads it)."""
    a = t.activation
    return QSpec(bits=min(a.bits, 8) if a is not None else 8, signed=False, symmetric=False,
                 observer=a.observer if a is not None else "minmax")


def _needs_output(t: QuantTarget) -> bool:
    return t.kind == "conv" and t.activation is not None and not t.activation.dynamic


def _observed(targets: list[QuantTarget], residuals: bool = False) -> dict[fx.Node, QSpec]:
    watch: dict[fx.Node, QSpec] = {}
    for t in targets:
        if t.activation is not None and not t.activation.dynamic and isinstance(t.node.args[0], fx.Node):
            watch.setdefault(t.node.args[0], t.activation)
            if _needs_output(t):
                watch.setdefault(_output_node(t), output_spec(t))
    if residuals:
        for out, spec in residual_outputs(targets).items():
            watch.setdefault(out, spec)
    return watch


def residual_outputs(targets: list[QuantTarget]) -> dict[fx.Node, QSpec]:
    """Residual adds (of the float graph) that read both operands quantized and whose output no static
    layer reads: their output (after a ReLU) -> the grid it is quantized to under ``residuals``.

    An add of a quantized conv output and a tensor quantized for a layer reads both quantized
    (:func:`_quantize_residuals`). Where the sum then feeds a quantized layer (the next ResNet block)
    it is quantized already; where it does not (the last block, before the pooling and the head) it
    was left in float, and a runtime ran the add, its ReLU and the layout change back in fp32. Quantized,
    the runtime fuses it into an int8 add (ONNX Runtime's ``QLinearAdd``, OpenVINO likewise), as its own
    static quantizer writes the model.
    """
    static = [t for t in targets if t.activation is not None and not t.activation.dynamic
              and isinstance(t.node.args[0], fx.Node)]
    outs = {_output_node(t): t for t in static if _needs_output(t)}
    inputs = {t.node.args[0] for t in static}
    if not outs:
        return {}
    graph = next(iter(outs)).graph
    found: dict[fx.Node, QSpec] = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _ADDS or len(n.args) < 2 or n.kwargs.get("alpha", 1) != 1:
            continue
        a, b = n.args[0], n.args[1]
        if not (a in outs or b in outs) or not all(x in outs or x in inputs for x in (a, b)):
            continue
        out = _after_relu(n)
        if out in inputs or any(u.op == "output" for u in out.users):
            continue  # quantized already, or the model's own output (no int8 add to gain, only its error)
        found[out] = output_spec(outs[a] if a in outs else outs[b])
    return found


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
                    percentile: float = 99.99, residuals: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrate the static activations the targets need; node name -> (scale, zero_point).

    Tensors in one :func:`share_groups` group get one observer, fed by every watched
    member, and the same parameters. ``residuals``: the outputs of :func:`residual_outputs` too.
    """
    watch = _observed(targets, residuals)
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


_ADDS = (aten.add.Tensor,)


def _static_dq(node: Any) -> bool:
    """``dq(q(x))`` on a calibrated (static) grid: its scale is a stored tensor, not computed at run time."""
    return (isinstance(node, fx.Node) and node.target is fxq.dequantize.default
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr")


def _quantize_residuals(gm: fx.GraphModule, static: dict[fx.Node, fx.Node]) -> int:
    """Let residual adds read both operands quantized; returns how many operands were switched.

    In a ResNet block ``relu(add(conv3(...), x))`` the conv's output is quantized already, and
    ``x`` is quantized for the next block's first conv, but the add read ``x`` in float: a
    runtime given the graph (OpenVINO, ONNX Runtime) then runs the add, its ReLU and the
    quantization after it as separate fp32 passes. With both operands quantized it fuses the add
    into the conv (``python bench/openvino_int8.py``, ResNet-50 8x224 on OpenVINO: 170 -> 105 ms,
    NNCF's int8 101 ms, which places its quantizers the same way). PyTorch's FX quantization
    quantizes both inputs of an add too.
    """
    switched = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _ADDS or len(n.args) < 2 or n.kwargs.get("alpha", 1) != 1:
            continue
        a, b = n.args[0], n.args[1]
        for mine, other in ((a, b), (b, a)):
            if _static_dq(other) and mine in static:
                n.replace_input_with(mine, static[mine])
                switched += 1
                break
    return switched


def _quantize_output(gm: fx.GraphModule, out: fx.Node, spec: QSpec, qparams: dict, meta_from: fx.Node) -> None:
    """Every user of ``out`` reads it quantized (``dq(q(out))`` on its calibrated grid, inserted right after it)."""
    g = gm.graph
    scale, zp = qparams[out.name]
    users, nxt = list(out.users), out.next
    s = _buffer(gm, "", f"{out.name}_scale", scale, nxt)
    z = _buffer(gm, "", f"{out.name}_zp", zp, nxt)
    with g.inserting_before(nxt):
        q = g.call_function(fxq.quantize.default, (out, s, z, spec.qmin, spec.qmax, 0))
        dq = g.call_function(fxq.dequantize.default, (q, s, z, 0))
    for n in (q, dq):
        copy_meta(n, meta_from)
    for u in users:
        u.replace_input_with(out, dq)


def materialize(gm: fx.GraphModule, targets: list[QuantTarget],
                qparams: dict[str, tuple[torch.Tensor, torch.Tensor]], residuals: bool = False,
                hessians: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Write the QDQ nodes for ``targets`` into ``gm`` (which must hold the targets' nodes).

    ``residuals``: a residual ``add`` whose one operand is a quantized conv output and whose other
    is a tensor quantized for a layer (a ResNet block's identity) reads that tensor's quantized
    form too (:func:`_quantize_residuals`).

    ``hessians``: weight attribute -> input Hessian, for the ``gptq`` weights
    (:func:`fxopt.quant.gptq.collect_hessians`); a ``gptq`` weight without one is quantized as ``mse``.
    """
    counts = {"weights": 0, "activations": 0, "dynamic": 0, "outputs": 0, "residuals": 0}
    sums = residual_outputs(targets) if residuals else {}
    weights: dict[tuple, tuple] = {}
    acts: dict[fx.Node, fx.Node] = {}
    static: dict[fx.Node, fx.Node] = {}  # float tensor -> its static dq(q(.)) form
    g = gm.graph
    for t in targets:
        node = t.node
        w_node = _weight_node(node, t.kind)
        key = (str(w_node.target), str(t.weight))
        if key not in weights:
            w = attr_tensor(gm, w_node)
            gs = t.weight.group_size if t.weight.granularity == "group" else 0
            h = (hessians or {}).get(str(w_node.target)) if t.weight.observer == "gptq" else None
            done = gptq_quantize(w, h, t.weight) if h is not None else None
            if done is not None:
                q, scale, zp = done
                counts["gptq_weights"] = counts.get("gptq_weights", 0) + 1
            else:
                if h is not None:  # not factorable, not finite, or no better than round-to-nearest
                    counts["gptq_declined"] = counts.get("gptq_declined", 0) + 1
                scale, zp = weight_qparams(w, t.weight)
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
        QuantAnnotation(t.weight, t.activation, isa_label() if int8_kernel_target(t) else None).write(node)
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
            if not a.dynamic:
                static[x] = acts[x]
            for n in (s, q, acts[x]):
                copy_meta(n, node)
        node.replace_input_with(x, acts[x])
        if _needs_output(t):
            _quantize_output(gm, _output_node(t), output_spec(t), qparams, node)
            counts["outputs"] += 1
    if residuals:
        counts["residuals"] = _quantize_residuals(gm, static)
        for out, spec in sums.items():
            add = out.args[0] if out.target in RELU_OPS else out
            if out.name not in qparams or not all(_static_dq(x) for x in add.args[:2]):
                continue  # (a layer kept in float: the add reads a float operand)
            _quantize_output(gm, out, spec, qparams, out)
            counts["residual_outputs"] = counts.get("residual_outputs", 0) + 1
    erase_dead(gm)
    propagate_meta(gm)
    return counts

"""``fxopt.export_onnx``: the optimized graph as an ONNX model, for ONNX Runtime, OpenVINO and the rest.

The graph is exported as it is (pruned layers pruned, casts cast, symbolic batch and sequence
dimensions dynamic) through ``torch.onnx.export(dynamo=True)``; fxopt's own ops are translated
into standard ONNX (opset 21), so no custom op library is needed to run the file:

=========================  ===============================================================
fxopt op                   ONNX
=========================  ===============================================================
``quantize``               ``QuantizeLinear`` (per tensor, per channel, blocked); a narrower
                           code range than the type's adds a ``Clip`` on the codes; a scale
                           computed at run time: ``Round(x * (1 / scale))``, as fxopt rounds
``dequantize``             ``DequantizeLinear`` (per tensor, per channel, blocked), else
                           ``(q - zero_point) * scale``
``dynamic_scale``          ``max(ReduceMax(x), -ReduceMin(x)) / qmax`` per row
``linear_int8``            ``QuantizeLinear`` -> ``MatMulInteger`` (uint8 x int8, int32
                           accumulation, as fbgemm) -> scales, bias
``linear_int8_dynamic``    per-row codes (on zero point qmax + 1, uint8) -> ``MatMulInteger``
                           -> per-row and per-channel scales
``conv2d_int8``            the QDQ form ONNX Runtime and OpenVINO fuse into int8 convs:
                           ``Q/DQ(x) -> Conv(DQ(W), DQ(int32 bias)) [-> Relu] -> Q/DQ``
``linear_wq``/``conv2d_wq`` ``DequantizeLinear`` of the stored codes (int4 codes unpacked to
                           int8) -> ``MatMul``/``Conv``
``embedding_wq``           ``Gather`` of the code rows and their scales -> dequantize
``quantize_dequantize``    ``QuantizeLinear`` [-> ``Clip``] -> ``DequantizeLinear`` (per tensor)
``linear_csr``             a dense ``MatMul`` (ONNX has no CSR matmul)
=========================  ===============================================================

Within integer rounding: ``QuantizeLinear`` divides by the scale where fxopt multiplies by its
float32 reciprocal (fbgemm's arithmetic), which can move a code by one at an exact tie; the int8
conv's bias is quantized to int32 with scale ``x_scale * w_scale`` as the ONNX QDQ format wants.
Everything else is the simulation's arithmetic. The file's inputs are named after the model's
forward parameters, its outputs after the output structure (``output``, ``output_0``...,
dict keys such as ``last_hidden_state``).

Example::

    >>> import torch, fxopt, tempfile, os
    >>> m = fxopt.compile(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(2, 8),))
    >>> path = fxopt.export_onnx(m, os.path.join(tempfile.mkdtemp(), "m.onnx"))  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import ExportError, InputError

__all__ = ["export_onnx", "onnx_bytes", "output_names", "OPSET", "translation_table", "register_translation",
           "exact_on", "exact_here", "EXACT_KEY", "U8_WEIGHTS"]

OPSET = 21
_EPS = float(torch.finfo(torch.float32).eps)


def _need_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install \"fxopt[onnx]\" "
                          "(onnx, onnxscript; add onnxruntime to run the file)")


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


_USER: dict = {}


def register_translation(op: Any, fn: Any) -> None:
    """Teach the exporter your own op: ``fn`` builds its ONNX from onnxscript ops (``from onnxscript import
    opset21 as op``), called with the op's tensor arguments as ONNX values and the rest as Python values::

        def my_scale(x, factor: float):
            return op.Mul(x, op.Constant(value_float=factor))
        register_translation(torch.ops.mylib.scale.default, my_scale)
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise InputError(f"register_translation takes an op overload such as torch.ops.mylib.op.default, got {op!r}")
    if not callable(fn):
        raise InputError("register_translation needs a function building the op's ONNX")
    _USER[op] = fn


def _untranslatable(gm: fx.GraphModule, table: dict) -> list[str]:
    """Custom ops of the graph (outside aten/prims) with no translation."""
    out = []
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace not in ("aten", "prims") \
                and t not in table and str(t) not in out:
            out.append(str(t))
    return out


# ---------------------------------------------------------------- translations (onnxscript, opset 21)
def translation_table() -> dict:
    """fxopt op -> its ONNX translation (what ``torch.onnx.export(custom_translation_table=)`` takes),
    with the translations registered by :func:`register_translation`."""
    from onnxscript import opset21 as op

    def const_f(v: float) -> Any:
        return op.Constant(value_float=float(v))

    def const_ints(v: list[int]) -> Any:
        return op.Constant(value_ints=[int(i) for i in v])

    def shape_of(t: Any) -> list | None:
        try:
            return [int(d) if isinstance(d, int) else None for d in t.shape]
        except (TypeError, AttributeError):
            return None

    def axis_of(scale: Any) -> tuple[str, int]:
        """How a scale broadcasts: ('tensor', 0), ('channel', axis) or ('other', 0)."""
        shape = shape_of(scale)
        if shape is None:
            return "other", 0
        big = [i for i, d in enumerate(shape) if d != 1]
        if not big:
            return "tensor", 0
        if len(big) == 1 and shape[big[0]] is not None:
            return "channel", big[0]
        return "other", 0

    def flat(t: Any) -> Any:
        return op.Reshape(t, const_ints([-1]))

    def scalar(t: Any) -> Any:
        return op.Squeeze(op.Reshape(t, const_ints([1])))

    def channel_zp(zp: Any, scale: Any) -> Any:
        """The zero point as a 1-D tensor of the scale's length (a shared one repeated)."""
        return flat(zp) if axis_of(zp)[0] == "channel" else op.Expand(flat(zp), op.Shape(flat(scale)))

    def code_type(signed: bool) -> int:
        return 3 if signed else 2  # TensorProto.INT8 / UINT8

    def clip_codes(q: Any, qmin: int, qmax: int, signed: bool) -> Any:
        lo, hi = (-128, 127) if signed else (0, 255)
        if (qmin, qmax) == (lo, hi):
            return q
        t = code_type(signed)
        return op.Clip(q, op.Cast(op.Constant(value_int=qmin), to=t), op.Cast(op.Constant(value_int=qmax), to=t))

    def q_linear(x: Any, scale: Any, zp: Any, qmin: int, qmax: int, group_size: int) -> Any:
        signed = qmin < 0
        t = code_type(signed)
        kind, axis = axis_of(scale)
        x = op.Cast(x, to=1)
        if group_size == 0 and kind in ("tensor", "channel"):
            s, z = (scalar(scale), scalar(op.Cast(zp, to=t))) if kind == "tensor" else \
                (flat(scale), op.Cast(channel_zp(zp, scale), to=t))
            q = op.QuantizeLinear(x, s, z, axis=axis) if kind == "channel" else op.QuantizeLinear(x, s, z)
            return clip_codes(q, qmin, qmax, signed)
        if group_size > 0:
            q = op.QuantizeLinear(x, op.Cast(scale, to=1), op.Cast(zp, to=t), axis=-1, block_size=group_size)
            return clip_codes(q, qmin, qmax, signed)
        # a scale computed at run time (per token): fxopt's arithmetic, exactly
        v = op.Add(op.Round(op.Mul(x, op.Reciprocal(op.Cast(scale, to=1)))), op.Cast(zp, to=1))
        return op.Cast(op.Clip(v, const_f(qmin), const_f(qmax)), to=t)

    def dq_linear(q: Any, scale: Any, zp: Any, group_size: int) -> Any:
        kind, axis = axis_of(scale)
        t = int(q.dtype) if q.dtype is not None else 3
        if group_size == 0 and kind == "tensor":
            return op.DequantizeLinear(q, scalar(op.Cast(scale, to=1)), scalar(op.Cast(zp, to=t)))
        if group_size == 0 and kind == "channel" and shape_of(q) is not None and axis < len(shape_of(q)):
            return op.DequantizeLinear(q, flat(op.Cast(scale, to=1)), op.Cast(channel_zp(zp, scale), to=t), axis=axis)
        if group_size > 0:
            z = op.Cast(op.Expand(zp, op.Shape(scale)), to=t)
            return op.DequantizeLinear(q, op.Cast(scale, to=1), z, axis=-1, block_size=group_size)
        return op.Mul(op.Sub(op.Cast(q, to=1), op.Cast(zp, to=1)), op.Cast(scale, to=1))

    def quantize(x, scale, zero_point, qmin: int, qmax: int, group_size: int):
        return q_linear(x, scale, zero_point, qmin, qmax, group_size)

    def dequantize(q, scale, zero_point, group_size: int):
        return dq_linear(q, scale, zero_point, group_size)

    def row_scale(x: Any, qmax: int) -> Any:
        axes = const_ints([-1])
        amax = op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))
        return op.Div(op.Max(amax, const_f(_EPS)), const_f(qmax))

    def dynamic_scale(x, qmax: int):
        return row_scale(op.Cast(x, to=1), qmax)

    def add_bias(y: Any, bias: Any) -> Any:
        return y if bias is None else op.Add(y, bias)

    def gemm_weight(w_q: Any, engine: str) -> tuple[Any, Any]:
        """(the [K, N] weight codes, their zero point) for ``MatMulInteger``: int8 codes, or (``U8_WEIGHTS``,
        see :func:`_prepare`) the same codes plus 128 as uint8 on zero point 128."""
        if engine == U8_WEIGHTS:
            return op.Transpose(w_q, perm=[1, 0]), op.Cast(op.Constant(value_int=128), to=2)
        return op.Transpose(w_q, perm=[1, 0]), None

    def linear_int8(x, w_q, w_scale, bias, x_scale: float, x_zp: int, x_qmax: int = 255, engine: str = ""):
        x = op.Cast(x, to=1)
        if x_qmax < 255:
            x = op.Clip(x, const_f((0 - x_zp) * x_scale), const_f((x_qmax - x_zp) * x_scale))
        zp = op.Cast(op.Constant(value_int=int(x_zp)), to=2)
        xq = op.QuantizeLinear(x, const_f(x_scale), zp)
        w, wzp = gemm_weight(w_q, engine)
        acc = op.MatMulInteger(xq, w, zp) if wzp is None else op.MatMulInteger(xq, w, zp, wzp)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(flat(w_scale), const_f(x_scale)))
        return add_bias(y, bias)

    def linear_int8_dynamic(x, w_q, w_scale, bias, x_qmax: int = 127, engine: str = ""):
        x = op.Cast(x, to=1)
        s = row_scale(x, x_qmax)
        codes = op.Clip(op.Round(op.Mul(x, op.Reciprocal(s))), const_f(-x_qmax), const_f(x_qmax))
        # the symmetric codes on zero point qmax + 1 as uint8 (1..255, or 1..127 for 7 bits), as fxopt's
        # kernel hands them to fbgemm: ORT's uint8 x int8 GEMM is its fast one (int8 x int8 measured 8x slower)
        zp = op.Cast(op.Constant(value_int=int(x_qmax) + 1), to=2)
        u8 = op.Cast(op.Add(codes, const_f(x_qmax + 1)), to=2)
        w, wzp = gemm_weight(w_q, engine)
        acc = op.MatMulInteger(u8, w, zp) if wzp is None else op.MatMulInteger(u8, w, zp, wzp)
        y = op.Mul(op.Mul(op.Cast(acc, to=1), s), flat(w_scale))
        return add_bias(y, bias)

    def conv2d_int8(x, w_q, w_scale, bias, stride, padding, dilation, groups: int, x_scale: float, x_zp: int,
                    out_scale: float, out_zp: int, relu: bool, x_qmax: int = 255, out_qmax: int = 255,
                    engine: str = ""):
        x = op.Cast(x, to=1)
        if x_qmax < 255:
            x = op.Clip(x, const_f((0 - x_zp) * x_scale), const_f((x_qmax - x_zp) * x_scale))
        zx = op.Cast(op.Constant(value_int=int(x_zp)), to=2)
        xd = op.DequantizeLinear(op.QuantizeLinear(x, const_f(x_scale), zx), const_f(x_scale), zx)
        ws = flat(w_scale)
        if engine == U8_WEIGHTS:
            w = op.DequantizeLinear(w_q, ws, op.Cast(op.Add(op.Mul(ws, const_f(0.0)), const_f(128.0)), to=2), axis=0)
        else:
            w = op.DequantizeLinear(w_q, ws, op.Cast(op.Mul(ws, const_f(0.0)), to=3), axis=0)
        b = None
        if bias is not None:  # the ONNX QDQ format's int32 bias, scale x_scale * w_scale
            bs = op.Mul(ws, const_f(x_scale))
            bq = op.Cast(op.Round(op.Div(op.Cast(bias, to=1), bs)), to=6)
            b = op.DequantizeLinear(bq, bs, op.Cast(op.Mul(bs, const_f(0.0)), to=6), axis=0)
        y = op.Conv(xd, w, b, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=groups)
        if relu:
            y = op.Relu(y)
        zo = op.Cast(op.Constant(value_int=int(out_zp)), to=2)
        q = clip_codes(op.QuantizeLinear(y, const_f(out_scale), zo), 0, out_qmax, False)
        return op.DequantizeLinear(q, const_f(out_scale), zo)

    def quantize_dequantize(x, scale: float, zp: int, qmax: int = 255):
        z = op.Cast(op.Constant(value_int=int(zp)), to=2)
        q = clip_codes(op.QuantizeLinear(op.Cast(x, to=1), const_f(scale), z), 0, qmax, False)
        return op.DequantizeLinear(q, const_f(scale), z)

    def weight(w_q: Any, w_scale: Any, w_zp: Any, group_size: int, bits: int) -> Any:
        if bits != 8:
            raise ExportError("packed int4 weights reach the ONNX translation unpacked; this graph was not "
                              "prepared by fxopt.export_onnx")
        return dq_linear(w_q, w_scale, w_zp, group_size)

    def linear_wq(x, w_q, w_scale, w_zp, bias, group_size: int, bits: int):
        if bits != 8:
            weight(w_q, w_scale, w_zp, group_size, bits)
        # the codes transposed to [K, N] and dequantized along N (per channel) or in blocks along K: the
        # layout ONNX Runtime's weight-only fusions expect (and a transpose *after* a per-axis
        # DequantizeLinear is what ORT 1.32's extended optimizations get wrong: measured)
        kind, _ = axis_of(w_scale)
        t = int(w_q.dtype) if w_q.dtype is not None else 3
        codes = op.Transpose(w_q, perm=[1, 0])
        if group_size > 0:
            s = op.Transpose(op.Cast(w_scale, to=1), perm=[1, 0])
            z = op.Transpose(op.Cast(op.Expand(w_zp, op.Shape(w_scale)), to=t), perm=[1, 0])
            w = op.DequantizeLinear(codes, s, z, axis=0, block_size=group_size)
        elif kind == "tensor":
            w = op.DequantizeLinear(codes, scalar(op.Cast(w_scale, to=1)), scalar(op.Cast(w_zp, to=t)))
        else:
            w = op.DequantizeLinear(codes, flat(op.Cast(w_scale, to=1)), op.Cast(channel_zp(w_zp, w_scale), to=t),
                                    axis=1)
        return add_bias(op.MatMul(x, op.CastLike(w, x)), bias)

    def conv2d_wq(x, w_q, w_scale, w_zp, bias, stride, padding, dilation, groups: int):
        w = op.CastLike(dq_linear(w_q, w_scale, w_zp, 0), x)
        return op.Conv(x, w, bias, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                       group=groups)

    def embedding_wq(w_q, indices, w_scale, w_zp, group_size: int, bits: int):
        if bits != 8:
            weight(w_q, w_scale, w_zp, group_size, bits)
        rows = op.Gather(w_q, indices, axis=0)
        shape = shape_of(w_q)
        groups = 1 if group_size <= 0 else shape[1] // group_size
        s = op.Gather(op.Reshape(op.Cast(w_scale, to=1), const_ints([shape[0], groups])), indices, axis=0)
        z = op.Gather(op.Reshape(op.Cast(op.Expand(w_zp, op.Shape(w_scale)), to=1), const_ints([shape[0], groups])),
                      indices, axis=0)
        if group_size <= 0:
            return op.Mul(op.Sub(op.Cast(rows, to=1), z), s)
        lead = op.Shape(indices)
        grouped = op.Reshape(op.Cast(rows, to=1), op.Concat(lead, const_ints([groups, group_size]), axis=0))
        x = op.Mul(op.Sub(grouped, op.Unsqueeze(z, const_ints([-1]))), op.Unsqueeze(s, const_ints([-1])))
        return op.Reshape(x, op.Concat(lead, const_ints([shape[1]]), axis=0))

    ops = torch.ops.fxopt
    return {ops.quantize.default: quantize, ops.dequantize.default: dequantize,
            ops.dynamic_scale.default: dynamic_scale, ops.linear_int8.default: linear_int8,
            ops.linear_int8_dynamic.default: linear_int8_dynamic, ops.conv2d_int8.default: conv2d_int8,
            ops.linear_wq.default: linear_wq, ops.conv2d_wq.default: conv2d_wq,
            ops.embedding_wq.default: embedding_wq, ops.quantize_dequantize.default: quantize_dequantize, **_USER}


# ---------------------------------------------------------------- preparing the graph
#: engine argument the exporter gives an int8 layer whose weights it stores as uint8 on zero point 128
U8_WEIGHTS = "u8-weights"
#: the exported model's metadata key saying where its integer arithmetic is exact: ``any`` CPU, or only
#: where the runtime's int8 kernels accumulate in int32 (``int32-dot-products``: VNNI, AMX, Arm)
EXACT_KEY = "fxopt.int8_exact"
#: the code width of the activation operand, per int8 op: (index of its qmax argument, widest 7-bit qmax)
_INT8_OPS = {"linear_int8": (6, 127), "linear_int8_dynamic": (4, 63), "conv2d_int8": (13, 127)}


def _full_args(n: fx.Node) -> list:
    """``n``'s arguments, positional, its schema's defaults filled in."""
    args = list(n.args)
    for a in n.target._schema.arguments[len(args):]:
        args.append(n.kwargs.get(a.name, a.default_value))
    return args


def _eight_bit_products(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """The layers that multiply 8-bit activation codes by 8-bit signed weights: lowered int8 ops, and
    weight ``dequantize`` nodes a static 8-bit activation ``dequantize`` meets (runtimes fuse those
    into their int8 kernels). A u8 x s8 kernel that sums pairs of products into a saturating int16
    (x86 without VNNI) is wrong for them; 7-bit codes or 7-bit weights never overflow."""
    from fxopt.ir.rewrite_utils import attr_tensor
    from fxopt.kernels.cpu_quant import weight_bits
    from fxopt.kernels.cpu_isa import weight_max
    ops = torch.ops.fxopt

    def const(n: Any) -> torch.Tensor | None:
        return attr_tensor(gm, n) if isinstance(n, fx.Node) and n.op == "get_attr" else None

    def wide_static_codes(n: Any) -> bool:
        return (isinstance(n, fx.Node) and n.target is ops.dequantize.default and isinstance(n.args[0], fx.Node)
                and n.args[0].target is ops.quantize.default and const(n.args[0].args[1]) is not None
                and n.args[0].args[4] - n.args[0].args[3] > 127)
    layers, weights = [], []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(getattr(n.target, "_overloadpacket", None), "__name__", "")
        if name in _INT8_OPS and getattr(n.target, "namespace", "") == "fxopt":
            at, narrow = _INT8_OPS[name]
            w = const(n.args[1])
            if w is not None and _full_args(n)[at] > narrow and weight_bits(w) == 8:
                layers.append(n)
        elif n.target is ops.dequantize.default:
            w, zp = const(n.args[0]), const(n.args[2])
            if (w is not None and zp is not None and w.dtype == torch.int8 and w.numel()
                    and int(w.abs().max()) > weight_max(7) and int(zp.min()) >= -128 and int(zp.max()) <= 127
                    and any(wide_static_codes(a) for u in n.users for a in u.args if a is not n)):
                weights.append(n)
    return layers, weights


def _prepare(gm: fx.GraphModule, portable: bool = True) -> tuple[fx.GraphModule, str]:
    """A copy whose int4 codes are unpacked (one int8 per code), whose CSR linears are dense and, where
    exactness asks for it, whose 8-bit x 8-bit layers keep their weights as uint8 on zero point 128
    (the same values; every runtime's u8 x u8 kernels are exact). With ``portable`` that is every such
    layer; else only on a CPU whose runtimes' u8 x s8 kernels saturate. Also returns what the file is
    exact on (:data:`EXACT_KEY`)."""
    from fxopt.kernels import cpu_isa
    from fxopt.kernels.cpu_quant import unpack_int4
    from fxopt.ir.rewrite_utils import attr_tensor
    import fxopt.kernels.cpu_sparse  # noqa: F401  (defines fxopt::linear_csr)
    ops = torch.ops.fxopt
    packed = (ops.linear_wq.default, ops.embedding_wq.default)

    def todo(g: fx.Graph) -> list[fx.Node]:
        return [n for n in g.nodes if n.op == "call_function" and (
            (n.target in packed and n.args[-1] == 4) or n.target is ops.linear_csr.default)]
    layers, weights = _eight_bit_products(gm)
    widen = portable or not cpu_isa.dot_products_exact()
    exact_on = "any" if widen or not (layers or weights) else "int32-dot-products"
    if not todo(gm.graph) and not (widen and (layers or weights)):
        return gm, exact_on
    gm = copy.deepcopy(gm)
    g = gm.graph
    if widen:
        names = {n.name for n in layers + weights}
        # the graph is only traced from here (fake tensors): fxopt's kernels never see these uint8 codes
        for i, n in enumerate(x for x in list(g.nodes) if x.name in names):
            at = (0, 2) if n.target is ops.dequantize.default else (1,)
            new_args = list(n.args) if n.target is ops.dequantize.default else [*_full_args(n)[:-1], U8_WEIGHTS]
            for j in at:
                name = f"_onnx_unsigned_{i}_{j}"
                gm.register_buffer(name, (attr_tensor(gm, n.args[j]).to(torch.int16) + 128).to(torch.uint8))
                with g.inserting_before(n):
                    new_args[j] = g.get_attr(name)
            n.args, n.kwargs = tuple(new_args), {}
    for i, n in enumerate(todo(g)):
        if n.target in packed:
            at = 1 if n.target is ops.linear_wq.default else 0
            name = f"_onnx_unpacked_{i}"
            gm.register_buffer(name, unpack_int4(attr_tensor(gm, n.args[at])))
            with g.inserting_before(n):
                codes = g.get_attr(name)
            n.args = (*n.args[:at], codes, *n.args[at + 1:-1], 8)
        else:
            x, crow, col, values, in_features, bias = n.args
            crow_t = attr_tensor(gm, crow)
            dense = torch.sparse_csr_tensor(crow_t, attr_tensor(gm, col), attr_tensor(gm, values),
                                            (crow_t.numel() - 1, in_features)).to_dense()
            name = f"_onnx_dense_{i}"
            gm.register_buffer(name, dense)
            with g.inserting_before(n):
                w = g.get_attr(name)
                new = g.call_function(torch.ops.aten.linear.default, (x, w, bias))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
    g.eliminate_dead_code()
    gm.recompile()
    return gm, exact_on


def output_names(gm: fx.GraphModule, outputs: Any) -> list[str]:
    """ONNX output names from the output structure: ``output``, ``output_0``..., dict keys."""
    paths, _ = pytree.tree_flatten_with_path(outputs)
    if len(paths) == 1 and not paths[0][0]:
        return ["output"]
    names = []
    for path, _leaf in paths:
        parts = []
        for k in path:
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
            parts.append(str(key))
        name = re.sub(r"[^0-9A-Za-z_]+", "_", "_".join(parts)).strip("_") or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        names.append(name)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return out


def onnx_bytes(module: fx.GraphModule, example_inputs: Any = None, *, dynamic: Any = None,
               opset: int = OPSET, portable: bool = True) -> bytes:
    """The serialized ONNX model of ``module`` (see :func:`export_onnx`; ``portable=False`` is the form
    fxopt's own runtimes run: exact on this CPU)."""
    _need_onnx()
    inner = getattr(module, "graph_module", None)  # a RuntimeModule: the graph it runs, exported again
    if not isinstance(module, fx.GraphModule) and isinstance(inner, fx.GraphModule):
        module = inner
    if not isinstance(module, fx.GraphModule):
        raise InputError(f"fxopt.export_onnx expects a module returned by fxopt.compile, fxopt.trace or fxopt.load, "
                         f"got {type(module).__name__}")
    from fxopt.ir.capture import dynamic_shapes_for, example_call
    from fxopt.ir.torch_compat import torch_internals
    args, kwargs = example_call(module, example_inputs, "fxopt.export_onnx")
    capture = module.meta.get("fxopt_capture", {})
    dyn = dynamic_shapes_for(module, args, kwargs, capture.get("dynamic") if dynamic is None else dynamic)
    with torch.no_grad():
        outputs = module(*args, **kwargs)
    gm, exact_on = _prepare(module, portable)
    names = output_names(gm, outputs)
    table = translation_table()
    missing = _untranslatable(gm, table)
    if missing:
        raise ExportError(f"ONNX export: no ONNX translation for {', '.join(missing)}; teach it one with "
                          "fxopt.runtime.onnx_export.register_translation(op, fn), or compile without the pass "
                          "that put it there")
    try:
        with torch_internals(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                prog = torch.onnx.export(gm, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dyn,
                                         custom_translation_table=table, opset_version=opset,
                                         output_names=names, optimize=True, verbose=False, report=False,
                                         external_data=False)
    except ExportError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {msg[0] if msg else ''}"
                          + _cause(e) + "; to find the pass that made the graph unexportable, export after "
                            "each stage (fxopt.compile(..., stop_after=N))") from e
    proto = prog.model_proto
    _keep_float_layers_float(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = EXACT_KEY, exact_on
    return proto.SerializeToString()


def _keep_float_layers_float(proto: Any) -> int:
    """Keep ONNX Runtime from quantizing the float layers of a quantized graph on its own.

    ONNX Runtime's ``WeightBiasQuantization`` (on by default) gives any ``Conv``/``ConvTranspose``/``Gemm``
    whose input comes from a per-tensor ``DequantizeLinear`` and whose weight is a float initializer a
    symmetric per-tensor int8 weight, then runs it as an int8 kernel: a layer fxopt kept in float
    (skipped, or too sensitive) would silently compute something else (measured: 1% of the output on a
    conv reading a quantized activation, 17% where the weight had been folded). Such a layer reads its
    input through the same dequantization written as float ops, ``(float(q) - zero_point) * scale``:
    the same values (``DequantizeLinear``'s own arithmetic), with no ``DequantizeLinear`` to match.
    Returns how many inputs it rewrote."""
    from onnx import TensorProto, helper
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    floats = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    dims = {t.name: list(t.dims) for t in g.initializer}
    dims.update({n.output[0]: list(a.t.dims) for n in g.node if n.op_type == "Constant" for a in n.attribute
                 if a.name == "value"})
    rewired, done = 0, {}
    for node in list(g.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or node.input[1] not in floats:
            continue
        if any(d != 1 for d in dims.get(dq.input[1], [0])):  # per-tensor scales only: a per-axis one ORT leaves
            continue
        if dq.output[0] not in done:
            base = f"{dq.output[0]}_float_dq"
            q, scale = dq.input[0], dq.input[1]
            nodes = [helper.make_node("Cast", [q], [f"{base}_q"], to=TensorProto.FLOAT, name=f"{base}_cast")]
            codes = f"{base}_q"
            if len(dq.input) > 2 and dq.input[2]:
                nodes.append(helper.make_node("Cast", [dq.input[2]], [f"{base}_zp"], to=TensorProto.FLOAT,
                                              name=f"{base}_cast_zp"))
                nodes.append(helper.make_node("Sub", [codes, f"{base}_zp"], [f"{base}_c"], name=f"{base}_sub"))
                codes = f"{base}_c"
            nodes.append(helper.make_node("Mul", [codes, scale], [base], name=f"{base}_mul"))
            at = list(g.node).index(node)
            for i, n in enumerate(nodes):
                g.node.insert(at + i, n)
            done[dq.output[0]] = base
        node.input[0] = done[dq.output[0]]
        rewired += 1
    return rewired


def exact_on(data: bytes) -> str:
    """Where an ONNX model fxopt exported computes its integer arithmetic exactly (:data:`EXACT_KEY`):
    ``any``, or ``int32-dot-products`` (CPUs whose runtimes' int8 kernels accumulate in int32)."""
    import onnx
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return props.get(EXACT_KEY, "int32-dot-products")


def exact_here(data: bytes) -> bool:
    """Does this CPU's runtimes compute ONNX model ``data``'s integer arithmetic exactly (see :func:`exact_on`)?"""
    from fxopt.kernels import cpu_isa
    return exact_on(data) == "any" or cpu_isa.dot_products_exact()


def _cause(e: BaseException) -> str:
    """The innermost message of a chained exporter error (the op that failed, usually)."""
    seen = e
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    if seen is e:
        return ""
    first = (str(seen).strip().splitlines() or [""])[0]
    return f" (cause: {type(seen).__name__}: {first[:300]})"


def export_onnx(module: fx.GraphModule, path: str | os.PathLike, example_inputs: Any = None, *,
                dynamic: Any = None, opset: int = OPSET, portable: bool = True) -> str:
    """Write ``module`` (from ``fxopt.compile``/``trace``/``load``) to ``path`` as an ONNX model.

    Every recipe exports: quantized graphs become QuantizeLinear/DequantizeLinear and integer
    MatMul (see the module docs for the table), pruned and cast graphs export as they are. The
    captured dynamic dimensions (batch, sequence) stay dynamic (``dynamic=`` as in
    :func:`fxopt.trace` to change that). ``example_inputs`` (``(args, kwargs)``) only for modules
    fxopt did not capture. Raises :class:`~fxopt.errors.ExportError` (with the op that does not
    translate) when the graph cannot be expressed in ONNX. Returns the path.

    ``portable`` (default): the file computes fxopt's integer arithmetic exactly on every CPU. A layer
    that multiplies 8-bit activation codes by 8-bit weights (planned on a CPU with VNNI) stores its
    weights as uint8 on zero point 128: on x86 CPUs without VNNI, ONNX Runtime's and OpenVINO's
    u8 x s8 kernels sum pairs of such products into a saturating int16 and are wrong (measured: up to
    99 output steps off), their u8 x u8 kernels are exact. ``portable=False`` keeps int8 weights where
    this CPU's runtimes sum them exactly (faster here; the file's metadata says
    ``fxopt.int8_exact=int32-dot-products`` and it is wrong on CPUs without VNNI).
    """
    data = onnx_bytes(module, example_inputs, dynamic=dynamic, opset=opset, portable=portable)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path

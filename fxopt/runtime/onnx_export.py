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

import os
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import ExportError, InputError
from fxopt.runtime.onnx_prepare import (EXACT_KEY, U8_WEIGHTS, exact_here, exact_on, keep_float_layers_float,
                                        pool_spatial_means, prepare)

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
        see :func:`~fxopt.runtime.onnx_prepare.prepare`) the same codes plus 128 as uint8 on zero point 128."""
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
    gm, exact = prepare(module, portable)
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
    keep_float_layers_float(proto)
    pool_spatial_means(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = EXACT_KEY, exact
    return proto.SerializeToString()


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

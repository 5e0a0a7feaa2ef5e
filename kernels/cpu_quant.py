"""Quantized CPU kernels as ``torch.ops.fxopt.*`` custom ops (what ``lower-quant`` emits).

Every int8 kernel has a pure-torch reference next to it (``*_reference``, collected in
:data:`REFERENCES`): the QDQ formula it must equal for *every* input, which
``lower-quant`` checks on the example inputs and at the edges of each layer's ranges.

* ``linear_int8``: static W8A8. fbgemm's ``linear_with_input_q_dq_qweight_dq_output_fp32``
  quantizes the fp32 input with the calibrated scale and zero point, runs the int8
  GEMM, and returns fp32; the bias is added in fp32 afterwards.
* ``linear_int8_dynamic``: per-token (per-row) symmetric activations. Each row is
  divided by its own scale ``amax|x_row| / qmax`` and handed to the same kernel with
  scale 1 and zero point ``qmax + 1``, so the kernel's rounding *is* the per-token
  rounding; the int32 results are multiplied back by the row scales.
* ``conv2d_int8``: static W8A8 convolution (optionally fused ReLU); its output is
  requantized with the calibrated output scale.
* ``quantize_dequantize``: ``dq(q(x))`` on a static unsigned grid in one vectorized pass
  (torch's quantize and dequantize), for a quantized tensor a float op reads (a ResNet
  block's identity going into the residual add); the simulation's two ops take four passes.
* ``linear_wq`` / ``conv2d_wq`` / ``embedding_wq``: weight-only int8 or packed int4
  (two values per byte) storage, dequantized on the fly (weight bytes fall 4x/8x; the
  matmul stays fp32).

**Code width and engine.** Each int8 op carries the width of its activation codes
(``x_qmax``: 255 or 127 static, 127 or 63 dynamic) and the engine chosen at lowering
(``fbgemm`` or ``onednn``). On x86 CPUs without VNNI both engines add pairs of u8 x s8
products into a saturating int16, so full-range codes give wrong sums; 7-bit codes
never do (:mod:`fxopt.kernels.cpu_isa` measures which width each engine computes
exactly, per layer shape: fbgemm's depthwise kernels saturate even with VNNI). At run
time each op checks that the engine is exact for its codes on *this* CPU, else takes
another engine or an exact fallback (two 7-bit GEMMs for ``codes = 2 * hi + lo``, or
the reference for convs): a model quantized with 8-bit codes on a VNNI machine and
loaded on an AVX2 one computes what its simulation computes (``fxopt.load`` says which
layers run the slower path: :func:`fallback_layers`).

Measured (``python bench/quant.py --kernels --engines``): fbgemm's int8 GEMMs run 2-3x
faster than fp32 ``linear`` on AVX2 and VNNI CPUs, oneDNN's are close (faster on some
shapes); ``torch._int_mm``/``torch._weight_int8pack_mm`` are 40-80x slower (naive loops).

The engines want their weights prepacked; packing takes about as long as one GEMM, so
the packed form is cached per weight tensor (keyed by identity and version, dropped
when the weight dies). The graph itself only holds plain int8/uint8 tensors and
scales, which is why a lowered graph still exports, saves and loads.
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.library import custom_op

import fxopt.quant.qops  # noqa: F401  (the references use torch.ops.fxopt.dynamic_scale)
from fxopt.quant import qspec
from fxopt.kernels import cpu_isa
from fxopt.quant.qspec import dequantize

__all__ = ["linear_int8", "linear_int8_dynamic", "conv2d_int8", "linear_int8_reference",
           "linear_int8_dynamic_reference", "conv2d_int8_reference", "REFERENCES", "fallback_layers", "int8_layer_plans", "linear_wq", "conv2d_wq", "embedding_wq",
           "pack_int4", "unpack_int4", "LOWERED_OPS", "quantize_dequantize", "quantize_dequantize_reference",
           "QDQ_REFERENCES"]

_CACHE: dict[tuple, tuple[Any, tuple, Any]] = {}
_EPS = torch.finfo(torch.float32).eps


def _per_channel(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated but still the fbgemm entry
        return torch._make_per_channel_quantized_tensor(
            w_q.contiguous(), w_scale.reshape(-1).double(), torch.zeros(w_q.shape[0], dtype=torch.long), 0)


def _packed(w_q: torch.Tensor, w_scale: torch.Tensor, kind: str, engine: str, extra: tuple = ()) -> Any:
    key = (id(w_q), kind, engine)  # one entry per engine: a weight two engines use is not repacked per call
    stamp = (w_q._version, w_scale._version, w_scale.data_ptr(),
             tuple((id(e), e._version) if isinstance(e, torch.Tensor) else e for e in extra))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w_q and hit[1] == stamp:
        return hit[2]
    if engine == "onednn" and kind == "linear":
        packed = torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)
    else:  # fbgemm's linears, and both engines' convs through torch's quantized-tensor API
        qw = _per_channel(w_q, w_scale)
        with cpu_isa.quantized_engine(engine):
            if kind == "linear":
                packed = torch.ops.quantized.linear_prepack(qw, None)
            else:
                stride, padding, dilation, groups, bias = extra[0], extra[1], extra[2], extra[3], extra[6]
                packed = torch.ops.quantized.conv2d_prepack(qw, bias, list(stride), list(padding), list(dilation),
                                                            groups)
    _CACHE[key] = (weakref.ref(w_q, lambda _r, k=key: _CACHE.pop(k, None)), stamp, packed)
    return packed


def _fbgemm_linear(x2: torch.Tensor, x_scale: float, x_zp: int, w_q: torch.Tensor,
                   w_scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's fused quantize + int8 GEMM + dequantize: ``sum_k (q(x) - zp) * w_q * w_scale * x_scale``.

    The only place the linear kernels call fbgemm (tests put an emulation of a saturating CPU here).
    """
    packed = _packed(w_q, w_scale, "linear", "fbgemm")
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2.contiguous(), x_scale, x_zp, packed)


def _qconv(engine: str, xq: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
           conv: tuple, out_scale: float, out_zp: int, relu: bool, dequantize: bool = False) -> torch.Tensor:
    """``engine``'s int8 conv of quantized ``xq``: the output codes (uint8) on the output grid, or
    (``dequantize``) their values ``(q - out_zp) * out_scale`` in fp32."""
    stride, padding, dilation, groups = conv
    packed = _packed(w_q, w_scale, "conv", engine, (tuple(stride), tuple(padding), tuple(dilation), groups,
                                                    float(xq.q_scale()), int(xq.q_zero_point()), bias))
    op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
    with cpu_isa.quantized_engine(engine):  # (the packed weight says which engine runs it)
        out = op(xq, packed, out_scale, out_zp)
    return out.dequantize() if dequantize else out.int_repr()


def _fbgemm_conv(xq: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 conv: tuple, out_scale: float, out_zp: int, relu: bool, dequantize: bool = False) -> torch.Tensor:
    """fbgemm's int8 conv (the only place the conv kernels call fbgemm: tests emulate a saturating CPU here)."""
    return _qconv("fbgemm", xq, w_q, w_scale, bias, conv, out_scale, out_zp, relu, dequantize)


def int8_layer_plans(gm: torch.nn.Module) -> dict[str, tuple[Optional[str], int, int]]:
    """layer -> (engine that runs it exactly here or None, activation bits, weight bits) for every int8
    kernel node of ``gm`` (the engine recorded at lowering where it is exact here, else another)."""
    out = {}
    for n in gm.graph.nodes if isinstance(getattr(gm, "graph", None), torch.fx.Graph) else []:
        if n.op != "call_function" or n.target not in REFERENCES or not isinstance(n.args[1], torch.fx.Node):
            continue
        try:
            w = gm.get_buffer(n.args[1].target) if n.args[1].op == "get_attr" else None
        except AttributeError:
            w = None
        if not isinstance(w, torch.Tensor):
            continue
        kind, bits, shape = _plan_key(n.target, list(n.args), tuple(w.shape))
        wb = weight_bits(w)
        engine = n.args[-1] if isinstance(n.args[-1], str) else ""
        out[n.name] = (cpu_isa.plan(kind, bits, engine, shape, wb), bits, wb)
    return out


def fallback_layers(gm: torch.nn.Module) -> list[str]:
    """Names of the int8 layers of ``gm`` that take the exact (slower) fallback on this CPU.

    A layer does when no engine here sums its activation codes exactly: e.g. 8-bit codes
    (planned on a VNNI machine) on an x86 CPU without VNNI. ``fxopt.load`` warns about them.
    """
    return [name for name, (engine, _, _) in int8_layer_plans(gm).items() if engine is None]


_WBITS: dict[int, tuple[Any, int, int]] = {}


def weight_bits(w_q: torch.Tensor) -> int:
    """7 when every weight code lies in -63..63 (a 7-bit spec), else 8: the kernels' exactness depends on it.

    Read from the codes themselves (cached per tensor and version), so a layer quantized with
    7-bit weights stays on the fast path wherever it is loaded.
    """
    key = id(w_q)
    hit = _WBITS.get(key)
    if hit is not None and hit[0]() is w_q and hit[1] == w_q._version:
        return hit[2]
    bits = 7 if w_q.numel() == 0 or int(w_q.abs().max()) <= cpu_isa.weight_max(7) else 8
    _WBITS[key] = (weakref.ref(w_q, lambda _r, k=key: _WBITS.pop(k, None)), w_q._version, bits)
    return bits


def _plan_key(target: Any, a: list, w_shape: tuple) -> tuple[str, int, tuple]:
    """(kind, activation bits, probe shape) of an int8 op call, from its arguments."""
    if target is torch.ops.fxopt.conv2d_int8.default:
        qmax = a[13] if len(a) > 13 else 255
        return "conv", 8 if qmax > 127 else 7, cpu_isa.conv_shape(w_shape, a[4], a[5], a[6], a[7])
    if target is torch.ops.fxopt.linear_int8.default:
        qmax = a[6] if len(a) > 6 else 255
        return "linear", 8 if qmax > 127 else 7, tuple(int(i) for i in w_shape)
    qmax = a[4] if len(a) > 4 else 127
    return "linear", 8 if qmax > 63 else 7, tuple(int(i) for i in w_shape)


@functools.lru_cache(maxsize=1)
def fbgemm_rounds_like_the_simulation() -> bool:
    """Does fbgemm's fused input quantization compute ``round(x / s) + zp``, as the QDQ simulation does?

    torch 2.13's fbgemm computes ``round(x / s + zp)`` in float32: for a value within an ulp of
    a .5 boundary the sum rounds onto the boundary and the code comes out one higher. Probed
    once with exactly such values; where it differs the kernels hand fbgemm integers instead.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    half = torch.arange(-100, 100, dtype=torch.float32) + 0.5  # every .5 boundary, and the floats next to it
    x = torch.stack([torch.nextafter(half, half + 1), torch.nextafter(half, half - 1), half]).reshape(-1, 50)
    eye = torch.eye(50, dtype=torch.int8)
    got = _fbgemm_linear(x, 1.0, 128, eye, torch.ones(50, 1))
    return bool(torch.equal(got, torch.round(x)))


def _codes(x2: torch.Tensor, scale: Any, zp: int, qmax: int) -> torch.Tensor:
    """uint8 activation codes, exactly as the QDQ simulation rounds them."""
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
    return qspec.quantize(x2, s, torch.tensor(zp, dtype=torch.int32), 0, qmax)


def _gemm_codes(codes: torch.Tensor, zp: int, w_q: torch.Tensor, w_scale: torch.Tensor, engine: str) -> torch.Tensor:
    """``sum_k (codes - zp) * w_q * w_scale`` over uint8 ``codes`` [M, K], exact in int32, fp32 out."""
    if engine == "onednn":
        packed = _packed(w_q, w_scale, "linear", engine)
        n = w_q.shape[0]
        return torch.ops.onednn.qlinear_pointwise(codes, 1.0, zp, packed, w_scale.reshape(-1).float(),
                                                  torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32,
                                                  "none", [], "")
    # fbgemm quantizes its fp32 input as round(x) + zp with scale 1: hand it codes - zp
    return _fbgemm_linear(codes.float() - zp, 1.0, zp, w_q, w_scale)


def _gemm_exact(codes: torch.Tensor, zp: int, w_q: torch.Tensor, w_scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Like :func:`_gemm_codes` on whichever engine is exact for ``qmax``-wide codes here; 8-bit codes on a
    CPU that would saturate them are split into two exact 7-bit GEMMs (``codes = 2 * hi + lo``)."""
    bits = 8 if qmax > 127 else 7
    shape, wb = tuple(w_q.shape), weight_bits(w_q)
    engine = cpu_isa.plan("linear", bits, "", shape, wb)
    if engine is not None:
        return _gemm_codes(codes, zp, w_q, w_scale, engine)
    engine = cpu_isa.plan("linear", 7, "", shape, wb)
    if engine is None:  # no exact int8 engine at all: float arithmetic on the codes
        return F.linear(codes.float() - zp, w_q.float() * w_scale.reshape(-1, 1))
    hi, lo = codes >> 1, codes & 1
    return _gemm_codes(hi, 0, w_q, w_scale, engine).mul_(2).add_(_gemm_codes(lo, zp, w_q, w_scale, engine))


def _linear_static(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zp: int,
                   x_qmax: int, engine: str) -> torch.Tensor:
    bits = 8 if x_qmax > 127 else 7
    use = cpu_isa.plan("linear", bits, engine, tuple(w_q.shape), weight_bits(w_q))
    if use == "fbgemm":
        if fbgemm_rounds_like_the_simulation():
            # fbgemm quantizes the fp32 input itself (fused) with codes in 0..255: clamping the input to
            # the range of the layer's codes first gives exactly clamp(round(x / s) + z, 0, qmax), and
            # keeps inputs of 2**31 steps and more (inf, 3e38) from overflowing its int32 to code 0
            x2 = x2.clamp(*_code_bounds(x_scale, x_zp, x_qmax))
            return _fbgemm_linear(x2, x_scale, x_zp, w_q, w_scale)
        # this fbgemm rounds its input differently (see below): round here, exactly as the simulation
        # does, and hand it integers (code - zero point) with scale 1, which it cannot round wrong
        ints = x2.mul(1.0 / torch.tensor(float(x_scale))).round_().clamp_(-x_zp, x_qmax - x_zp)
        return _fbgemm_linear(ints, 1.0, x_zp, w_q, w_scale).mul_(x_scale)
    codes = _codes(x2, x_scale, x_zp, x_qmax)
    if use == "onednn":
        return _gemm_codes(codes, x_zp, w_q, w_scale, "onednn").mul_(x_scale)
    return _gemm_exact(codes, x_zp, w_q, w_scale, x_qmax).mul_(x_scale)


def linear_int8_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                          x_scale: float, x_zp: int, x_qmax: int = 255, engine: str = "") -> torch.Tensor:
    """The simulated QDQ formula of a static int8 linear: what :func:`linear_int8` computes."""
    s, z = torch.tensor(float(x_scale)), torch.tensor(int(x_zp), dtype=torch.int32)
    xs = qspec.dequantize(qspec.quantize(x.float(), s, z, 0, x_qmax), s, z)
    return F.linear(xs, w_q.float() * w_scale.reshape(-1, 1), bias)


def linear_int8_dynamic_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                                  bias: Optional[torch.Tensor], x_qmax: int = 127, engine: str = "") -> torch.Tensor:
    """The simulated QDQ formula of a dynamic (per-token) int8 linear: what :func:`linear_int8_dynamic` computes."""
    st = torch.ops.fxopt.dynamic_scale(x, x_qmax)
    z = torch.zeros((), dtype=torch.int32)
    xs = qspec.dequantize(qspec.quantize(x.float(), st, z, -x_qmax, x_qmax), st, z)
    return F.linear(xs, w_q.float() * w_scale.reshape(-1, 1), bias)


@custom_op("fxopt::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                x_scale: float, x_zp: int, x_qmax: int = 255, engine: str = "fbgemm") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).float()
    out = _linear_static(x2, w_q, w_scale, x_scale, x_zp, x_qmax, engine)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@linear_int8.register_fake
def _(x, w_q, w_scale, bias, x_scale, x_zp, x_qmax=255, engine="fbgemm"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


@custom_op("fxopt::linear_int8_dynamic", mutates_args=())
def linear_int8_dynamic(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                        x_qmax: int = 127, engine: str = "fbgemm") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).float()
    # max |x| per row as max(amax, -amin): two reductions and no temporary (abs().amax() writes one, and
    # vector_norm(inf) is 7x slower); exactly the same value
    row_scale = torch.maximum(x2.amax(-1, keepdim=True), x2.amin(-1, keepdim=True).neg_())
    row_scale.clamp_min_(_EPS).div_(x_qmax)
    # rows divided by their own scale: the kernel's rounding with scale 1 *is* the per-token rounding, and
    # the symmetric codes -qmax..qmax sit on zero point qmax + 1 (1..255 for 8 bits, 1..127 for 7)
    zp = x_qmax + 1
    bits = 8 if x_qmax > 63 else 7
    use = cpu_isa.plan("linear", bits, engine, tuple(w_q.shape), weight_bits(w_q))
    scaled = x2 * (1.0 / row_scale)
    if use != "fbgemm" or not fbgemm_rounds_like_the_simulation():
        scaled.round_()  # integers for this fbgemm too (see _linear_static)
    if use == "fbgemm":
        out = _fbgemm_linear(scaled, 1.0, zp, w_q, w_scale)
    else:
        codes = scaled.add_(zp).clamp_(1, 2 * x_qmax + 1).to(torch.uint8)  # (scaled is ours: in place)
        out = (_gemm_codes(codes, zp, w_q, w_scale, "onednn") if use == "onednn"
               else _gemm_exact(codes, zp, w_q, w_scale, 2 * x_qmax + 1))
    out.mul_(row_scale)  # in place: a new output would cost its page faults again
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@linear_int8_dynamic.register_fake
def _(x, w_q, w_scale, bias, x_qmax=127, engine="fbgemm"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


def _conv_out(size: Any, k: int, s: int, p: int, d: int) -> Any:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d_int8_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                          stride: list[int], padding: list[int], dilation: list[int], groups: int, x_scale: float,
                          x_zp: int, out_scale: float, out_zp: int, relu: bool, x_qmax: int = 255,
                          out_qmax: int = 255, engine: str = "") -> torch.Tensor:
    """The simulated QDQ formula of a static int8 conv: what :func:`conv2d_int8` computes."""
    t = torch.tensor
    xs = qspec.dequantize(qspec.quantize(x.float(), t(x_scale), t(x_zp), 0, x_qmax), t(x_scale), t(x_zp))
    y = F.conv2d(xs, w_q.float() * w_scale.reshape(-1, 1, 1, 1), bias, stride, padding, dilation, groups)
    y = y.relu() if relu else y
    return qspec.dequantize(qspec.quantize(y, t(out_scale), t(out_zp), 0, out_qmax), t(out_scale), t(out_zp))


@custom_op("fxopt::conv2d_int8", mutates_args=())
def conv2d_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                stride: list[int], padding: list[int], dilation: list[int], groups: int, x_scale: float,
                x_zp: int, out_scale: float, out_zp: int, relu: bool, x_qmax: int = 255, out_qmax: int = 255,
                engine: str = "fbgemm") -> torch.Tensor:
    bits = 8 if x_qmax > 127 else 7
    use = cpu_isa.plan("conv", bits, engine, cpu_isa.conv_shape(w_q.shape, stride, padding, dilation, groups),
                       weight_bits(w_q))
    if use is None:
        return conv2d_int8_reference(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                                     out_scale, out_zp, relu, x_qmax, out_qmax)
    # to the layer's code range (7-bit codes), and so that no input overflows the quantizer (see _linear_static)
    xf = x.float().clamp(*_code_bounds(x_scale, x_zp, x_qmax))
    b = None if bias is None else bias.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # any layout: both engines work channels-last, and their own outputs are channels-last already
        xq = torch.quantize_per_tensor(xf, x_scale, x_zp, torch.quint8)
    run = _fbgemm_conv if use == "fbgemm" else functools.partial(_qconv, "onednn")
    conv = (stride, padding, dilation, groups)
    if out_qmax == 255:  # the engine's own dequantize: the simulation's (q - z) * s, fused
        return run(xq, w_q, w_scale, b, conv, out_scale, out_zp, relu, dequantize=True)
    q = run(xq, w_q, w_scale, b, conv, out_scale, out_zp, relu)
    if out_qmax < 255:
        q = q.clamp(max=out_qmax)
    return qspec.dequantize(q, torch.tensor(out_scale), torch.tensor(out_zp))


@conv2d_int8.register_fake
def _(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, out_scale, out_zp, relu,
      x_qmax=255, out_qmax=255, engine="fbgemm"):
    h = _conv_out(x.shape[2], w_q.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], w_q.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w_q.shape[0], h, w), dtype=torch.float32)


# ---------------------------------------------------------------- weight-only
def quantize_dequantize_reference(x: torch.Tensor, scale: float, zp: int, qmax: int = 255) -> torch.Tensor:
    """The simulated ``dequantize(quantize(x, scale, zp, 0, qmax))``: what :func:`quantize_dequantize` computes."""
    s, z = torch.tensor(scale), torch.tensor(zp)
    return qspec.dequantize(qspec.quantize(x.float(), s, z, 0, qmax), s, z)


@custom_op("fxopt::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zp: int, qmax: int = 255) -> torch.Tensor:
    """``dq(q(x))`` on the static grid ``scale``, ``zp``, codes ``0..qmax``, fused.

    torch's per-tensor quantize (fbgemm's on x86: ``round(x * (1 / scale)) + zp`` with the
    float32 reciprocal, halves to even, clamped to 0..255) and its dequantize
    ``(q - zp) * scale`` are the simulation's arithmetic, one vectorized pass each; a narrower
    range (7-bit codes) clamps the result at code ``qmax``, the same float32 value. NaN inputs
    have no code (the simulation's cast of NaN is undefined too).
    """
    if x.dtype != torch.float32 or not 0 <= zp <= qmax <= 255 or not scale > 0:
        return quantize_dequantize_reference(x, scale, zp, qmax)
    # clamped to the float32 values of codes 0 and qmax first: beyond about 2**31 steps (inf, 3e38) torch's
    # quantize overflows its int32 and returns code 0 where the simulation saturates
    if not torch_quantize_rounds_like_the_simulation():
        return quantize_dequantize_reference(x, scale, zp, qmax)
    xc = x.clamp(*_code_bounds(scale, zp, qmax))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated; the reference stands in
            return torch.quantize_per_tensor(xc, scale, zp, torch.quint8).dequantize()
    except (AttributeError, RuntimeError):
        return quantize_dequantize_reference(x, scale, zp, qmax)


@functools.lru_cache(maxsize=1)
def torch_quantize_rounds_like_the_simulation() -> bool:
    """Does ``torch.quantize_per_tensor`` round as the QDQ simulation does, next to every .5 boundary?

    torch 2.13 computes ``round(x / s + zp)`` in float32 (like its fbgemm, see
    :func:`fbgemm_rounds_like_the_simulation`): one code off within an ulp of a tie. Probed once,
    at several scales and zero points, with the values either side of each boundary; where it
    differs :func:`quantize_dequantize` computes the reference instead (a few vectorized passes).
    """
    try:
        for scale, zp in ((1.0, 128), (0.8823862671852112, 169), (0.0371, 3), (3.7, 250)):
            half = (torch.arange(-zp, 256 - zp, dtype=torch.float32) + 0.5) * scale
            x = torch.cat([torch.nextafter(half, half + 1), torch.nextafter(half, half - 1), half])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = torch.quantize_per_tensor(x, scale, zp, torch.quint8).dequantize()
            if not torch.equal(got, quantize_dequantize_reference(x, scale, zp, 255)):
                return False
    except (AttributeError, RuntimeError):
        return False
    return True


def _code_bounds(scale: float, zp: int, qmax: int) -> tuple[float, float]:
    """The float32 values of codes 0 and ``qmax`` on the grid ``scale``, ``zp``."""
    s = torch.tensor(scale, dtype=torch.float32)
    return float(torch.tensor(0 - zp, dtype=torch.float32) * s), float(torch.tensor(qmax - zp, dtype=torch.float32) * s)


@quantize_dequantize.register_fake
def _(x, scale, zp, qmax=255):
    return torch.empty_like(x, dtype=torch.float32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (last dim even) -> uint8, two per byte (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(q.shape)}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), -1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _dequant_weight(w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor, group_size: int,
                    bits: int) -> torch.Tensor:
    q = unpack_int4(w_q) if bits == 4 else w_q
    return dequantize(q, w_scale, w_zp, group_size)


#: per thread, float32 scratch weights by shape: a fresh multi-megabyte tensor per call costs its page
#: faults (measured on MiniLM's 1536x384 layers at 1,024 tokens: linear_wq 7.0 ms against fp32 6.6 ms,
#: 6.7 ms with the weight dequantized into a reused buffer)
_SCRATCH = threading.local()


def _dequant_into_scratch(w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor, group_size: int,
                          bits: int) -> torch.Tensor:
    """:func:`_dequant_weight` (the same arithmetic: ``(q - zp) * scale`` in float32) written into this
    thread's reused buffer of the weight's shape. Valid until the next call on this thread for that shape:
    only for a weight consumed at once (the op has no autograd, so nothing keeps it)."""
    q = unpack_int4(w_q) if bits == 4 else w_q
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(tuple(q.shape))
    if buf is None:
        buf = bufs[tuple(q.shape)] = torch.empty(q.shape, dtype=torch.float32)
    if group_size > 0:
        view = buf.view(*q.shape[:-1], q.shape[-1] // group_size, group_size)
        view.copy_(q.view(view.shape)).sub_(w_zp.unsqueeze(-1).float()).mul_(w_scale.unsqueeze(-1).float())
    else:
        buf.copy_(q).sub_(w_zp.float()).mul_(w_scale.float())
    return buf


@custom_op("fxopt::linear_wq", mutates_args=())
def linear_wq(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    if x.dtype == torch.float32 and w_q.dim() == 2:
        return F.linear(x, _dequant_into_scratch(w_q, w_scale, w_zp, group_size, bits), bias)
    return F.linear(x, _dequant_weight(w_q, w_scale, w_zp, group_size, bits).to(x.dtype), bias)


@linear_wq.register_fake
def _(x, w_q, w_scale, w_zp, bias, group_size, bits):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@custom_op("fxopt::conv2d_wq", mutates_args=())
def conv2d_wq(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
              bias: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
              groups: int) -> torch.Tensor:
    w = _dequant_weight(w_q, w_scale, w_zp, 0, 8).to(x.dtype)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


@conv2d_wq.register_fake
def _(x, w_q, w_scale, w_zp, bias, stride, padding, dilation, groups):
    h = _conv_out(x.shape[2], w_q.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], w_q.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w_q.shape[0], h, w))


@custom_op("fxopt::embedding_wq", mutates_args=())
def embedding_wq(w_q: torch.Tensor, indices: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
                 group_size: int, bits: int) -> torch.Tensor:
    rows = F.embedding(indices, w_q)
    scale = F.embedding(indices, w_scale.reshape(w_q.shape[0], -1))
    zp = F.embedding(indices, w_zp.reshape(w_q.shape[0], -1))
    return _dequant_weight(rows, scale, zp, group_size, bits)


@embedding_wq.register_fake
def _(w_q, indices, w_scale, w_zp, group_size, bits):
    dim = w_q.shape[1] * (2 if bits == 4 else 1)
    return w_q.new_empty((*indices.shape, dim), dtype=torch.float32)


#: each int8 kernel -> its pure-torch reference (the QDQ formula it must equal for every input)
REFERENCES = {torch.ops.fxopt.linear_int8.default: linear_int8_reference,
              torch.ops.fxopt.linear_int8_dynamic.default: linear_int8_dynamic_reference,
              torch.ops.fxopt.conv2d_int8.default: conv2d_int8_reference}

#: fused quantize-dequantize kernels -> their references
QDQ_REFERENCES = {torch.ops.fxopt.quantize_dequantize.default: quantize_dequantize_reference}

LOWERED_OPS = {torch.ops.fxopt.quantize_dequantize.default, torch.ops.fxopt.linear_int8.default, torch.ops.fxopt.linear_int8_dynamic.default,
               torch.ops.fxopt.conv2d_int8.default, torch.ops.fxopt.linear_wq.default,
               torch.ops.fxopt.conv2d_wq.default, torch.ops.fxopt.embedding_wq.default}

"""Quantized CPU kernels as ``torch.ops.fxopt.*`` custom ops (what ``lower-quant`` emits).

Measured on this 2-core AVX2 CPU (``python bench/quant.py --kernels``): PyTorch's
fbgemm int8 GEMMs run 2-3.6x faster than fp32 ``linear`` and its int8 conv up to 10x
faster than fp32 conv, while ``torch._int_mm``/``torch._weight_int8pack_mm``/
``torch._weight_int4pack_mm_for_cpu`` are 40-80x slower (naive loops). So:

* ``linear_int8``: static W8A8. fbgemm's ``linear_with_input_q_dq_qweight_dq_output_fp32``
  quantizes the fp32 input with the calibrated scale and zero point, runs the int8
  GEMM, and returns fp32; the bias is added in fp32 afterwards.
* ``linear_int8_dynamic``: per-token (per-row) symmetric activations. Each row is
  divided by its own scale ``amax|x_row| / 127`` and handed to the same kernel with
  scale 1 and zero point 128, so the kernel's rounding *is* the per-token rounding;
  the int32 results are multiplied back by the row scales.
* ``conv2d_int8``: static W8A8 convolution (optionally fused ReLU) with fbgemm's
  quantized conv; its output is requantized with the calibrated output scale.
* ``linear_wq`` / ``conv2d_wq`` / ``embedding_wq``: weight-only int8 or packed int4
  (two values per byte) storage, dequantized on the fly (weight bytes fall 4x/8x; the
  matmul stays fp32).

fbgemm wants its weights prepacked; packing takes about as long as one GEMM, so the
packed form is cached per weight tensor (keyed by identity and version, dropped when
the weight dies). The graph itself only holds plain int8/uint8 tensors and scales,
which is why a lowered graph still exports, saves and loads.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.library import custom_op

from fxopt.qspec import dequantize

__all__ = ["linear_int8", "linear_int8_dynamic", "conv2d_int8", "linear_wq", "conv2d_wq", "embedding_wq",
           "pack_int4", "unpack_int4", "LOWERED_OPS"]

_CACHE: dict[int, tuple[Any, tuple, Any]] = {}


def _per_channel(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated but still the fbgemm entry
        return torch._make_per_channel_quantized_tensor(
            w_q.contiguous(), w_scale.reshape(-1).double(), torch.zeros(w_q.shape[0], dtype=torch.long), 0)


def _packed(w_q: torch.Tensor, w_scale: torch.Tensor, kind: str, extra: tuple = ()) -> Any:
    key = id(w_q)
    stamp = (w_q._version, w_scale._version, w_scale.data_ptr(), kind, extra)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w_q and hit[1] == stamp:
        return hit[2]
    qw = _per_channel(w_q, w_scale)
    if kind == "linear":
        packed = torch.ops.quantized.linear_prepack(qw, None)
    else:
        stride, padding, dilation, groups, bias = extra[0], extra[1], extra[2], extra[3], extra[4]
        packed = torch.ops.quantized.conv2d_prepack(qw, bias, list(stride), list(padding), list(dilation), groups)
    _CACHE[key] = (weakref.ref(w_q, lambda _r, k=key: _CACHE.pop(k, None)), stamp, packed)
    return packed


def _gemm(x2: torch.Tensor, packed: Any, scale: float, zp: int) -> torch.Tensor:
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, scale, zp, packed)


@custom_op("fxopt::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                x_scale: float, x_zp: int) -> torch.Tensor:
    packed = _packed(w_q, w_scale, "linear")
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = _gemm(x2, packed, x_scale, x_zp)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@linear_int8.register_fake
def _(x, w_q, w_scale, bias, x_scale, x_zp):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


@custom_op("fxopt::linear_int8_dynamic", mutates_args=())
def linear_int8_dynamic(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    packed = _packed(w_q, w_scale, "linear")
    x2 = x.reshape(-1, x.shape[-1]).float()
    row_scale = x2.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps) / 127
    out = _gemm((x2 * (1.0 / row_scale)).contiguous(), packed, 1.0, 128)
    out.mul_(row_scale)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@linear_int8_dynamic.register_fake
def _(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


def _conv_out(size: Any, k: int, s: int, p: int, d: int) -> Any:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@custom_op("fxopt::conv2d_int8", mutates_args=())
def conv2d_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                stride: list[int], padding: list[int], dilation: list[int], groups: int, x_scale: float,
                x_zp: int, out_scale: float, out_zp: int, relu: bool) -> torch.Tensor:
    b = None if bias is None else bias.float()
    packed = _packed(w_q, w_scale, "conv", (tuple(stride), tuple(padding), tuple(dilation), groups, b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xq = torch.quantize_per_tensor(x.float().contiguous(), x_scale, x_zp, torch.quint8)
    op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
    return op(xq, packed, out_scale, out_zp).dequantize()


@conv2d_int8.register_fake
def _(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, out_scale, out_zp, relu):
    h = _conv_out(x.shape[2], w_q.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], w_q.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w_q.shape[0], h, w), dtype=torch.float32)


# ---------------------------------------------------------------- weight-only
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


@custom_op("fxopt::linear_wq", mutates_args=())
def linear_wq(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
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


LOWERED_OPS = {torch.ops.fxopt.linear_int8.default, torch.ops.fxopt.linear_int8_dynamic.default,
               torch.ops.fxopt.conv2d_int8.default, torch.ops.fxopt.linear_wq.default,
               torch.ops.fxopt.conv2d_wq.default, torch.ops.fxopt.embedding_wq.default}

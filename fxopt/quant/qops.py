"""The quantize/dequantize ops of fxopt's QDQ dialect: ``torch.ops.fxopt.quantize`` & co.

``insert-qdq`` writes these explicit nodes into the graph, so a quantized graph is
inspectable and its numerics are simulated exactly (in float) before lowering:

* ``fxopt.quantize(x, scale, zero_point, qmin, qmax, group_size) -> int8/uint8``
* ``fxopt.dequantize(q, scale, zero_point, group_size) -> float32``
* ``fxopt.dynamic_scale(x, qmax) -> scale``: the per-row (per-token) symmetric scale
  ``amax(|x|, -1) / qmax``, computed at run time (dynamic quantization).

They are ``torch.library`` custom ops with fake (meta) implementations, so graphs
holding them export, save and load (:func:`fxopt.save`). The arithmetic is
:func:`fxopt.quant.qspec.quantize` / :func:`fxopt.quant.qspec.dequantize`.

    >>> import torch, fxopt
    >>> s, z = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    >>> q = torch.ops.fxopt.quantize(torch.tensor([1.2, -3.0, 99.0]), s, z, -127, 127, 0)
    >>> q.tolist(), torch.ops.fxopt.dequantize(q, s, z, 0).tolist()
    ([2, -6, 127], [1.0, -3.0, 63.5])
"""
from __future__ import annotations

import torch
from torch.library import custom_op

from fxopt.quant import qspec

__all__ = ["quantize", "dequantize", "dynamic_scale", "QDQ_OPS"]

_EPS = torch.finfo(torch.float32).eps


@custom_op("fxopt::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             group_size: int) -> torch.Tensor:
    return qspec.quantize(x.float(), scale, zero_point, qmin, qmax, group_size)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax, group_size):
    return torch.empty_like(x, dtype=torch.int8 if qmin < 0 else torch.uint8)


@custom_op("fxopt::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int) -> torch.Tensor:
    return qspec.dequantize(q, scale, zero_point, group_size)


@dequantize.register_fake
def _(q, scale, zero_point, group_size):
    return torch.empty_like(q, dtype=torch.float32)


@custom_op("fxopt::dynamic_scale", mutates_args=())
def dynamic_scale(x: torch.Tensor, qmax: int) -> torch.Tensor:
    return x.detach().abs().amax(-1, keepdim=True).float().clamp_min(_EPS) / qmax


@dynamic_scale.register_fake
def _(x, qmax):
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


QDQ_OPS = {torch.ops.fxopt.quantize.default, torch.ops.fxopt.dequantize.default,
           torch.ops.fxopt.dynamic_scale.default}

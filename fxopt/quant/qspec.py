"""Quantization specs and the exact integer arithmetic they describe.

A :class:`QSpec` says how one tensor is quantized: bit width, signed or not,
symmetric or affine, and the granularity of its scales:

* ``tensor``: one scale for the whole tensor;
* ``channel``: one scale per slice along ``axis`` (output channels of a weight);
* ``group``: one scale per ``group_size`` consecutive elements of the last dimension
  (per output row of a weight), the int4 weight-only layout;
* ``token``: one scale per row (all dimensions but the last), computed at run time
  (``dynamic``).

Specs have a short text form used in pipeline strings and configs::

    >>> from fxopt.quant.qspec import QSpec
    >>> QSpec.parse("int8/channel")
    QSpec('int8/channel')
    >>> s = QSpec.parse("uint8/tensor/asym/percentile")
    >>> s.qmin, s.qmax, s.symmetric, s.observer
    (0, 255, False, 'percentile')
    >>> QSpec.parse("int4/group64").group_size
    64

Integer ranges: symmetric signed specs use ``[-(2^(b-1)-1), 2^(b-1)-1]`` (-127..127
for int8, so that zero is exact and the range is symmetric); unsigned affine specs use
``[0, 2^b-1]``. ``quantize``/``dequantize`` are the exact formulas the QDQ graph and the
lowered kernels both follow: ``q = clamp(round(x * (1/scale)) + zero_point, qmin, qmax)``
(round half to even) and ``x' = (q - zero_point) * scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.errors import PipelineError

__all__ = ["QSpec", "quantize", "dequantize", "qparams_from_range", "GRANULARITIES", "OBSERVERS"]

GRANULARITIES = ("tensor", "channel", "group", "token")
OBSERVERS = ("minmax", "moving-average", "percentile", "mse", "gptq")


@dataclass(frozen=True)
class QSpec:
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    dynamic: bool = False
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise PipelineError(f"quantization bits must be 2..8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise PipelineError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.observer not in OBSERVERS:
            raise PipelineError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.granularity == "group" and self.group_size < 2:
            raise PipelineError(f"group size must be >= 2, got {self.group_size}")
        if self.granularity == "token" and not self.dynamic:
            object.__setattr__(self, "dynamic", True)
        if self.dynamic and not self.symmetric:
            raise PipelineError("dynamic quantization is symmetric in fxopt (its kernels compute |x| max per row)")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    # -- text form -------------------------------------------------------
    @classmethod
    def parse(cls, text: "str | QSpec") -> "QSpec":
        """``int8/channel``, ``uint8/tensor/asym``, ``int4/group128/mse``, ``int8/token`` ..."""
        if isinstance(text, QSpec):
            return text
        parts = [p for p in str(text).strip().lower().split("/") if p]
        if not parts:
            raise PipelineError("empty quantization spec; write e.g. 'int8/channel' or 'uint8/tensor/asym'")
        kind = parts[0]
        if kind.startswith("uint") and kind[4:].isdigit():
            opts: dict = {"bits": int(kind[4:]), "signed": False, "symmetric": False}
        elif kind.startswith("int") and kind[3:].isdigit():
            opts = {"bits": int(kind[3:])}
        else:
            raise PipelineError(f"quantization spec {text!r}: must start with intN or uintN (int8, uint8, int4)")
        for p in parts[1:]:
            if p in ("tensor", "channel", "token"):
                opts["granularity"] = p
            elif p.startswith("group"):
                opts["granularity"] = "group"
                if p[5:]:
                    if not p[5:].isdigit():
                        raise PipelineError(f"quantization spec {text!r}: group size must be a number ({p})")
                    opts["group_size"] = int(p[5:])
            elif p.startswith("axis") and p[4:].lstrip("-").isdigit():
                opts["axis"] = int(p[4:])
            elif p in ("sym", "symmetric"):
                opts["symmetric"] = True
            elif p in ("asym", "affine"):
                opts["symmetric"] = False
            elif p == "dynamic":
                opts["dynamic"] = True
            elif p in OBSERVERS:
                opts["observer"] = p
            else:
                raise PipelineError(f"quantization spec {text!r}: unknown part {p!r}; parts are tensor, channel, "
                                    f"token, groupN, axisN, sym, asym, dynamic, and an observer {OBSERVERS}")
        return cls(**opts)

    def __str__(self) -> str:
        kind = f"{'int' if self.signed else 'uint'}{self.bits}"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        parts = [kind, gran]
        if self.granularity == "channel" and self.axis != 0:
            parts.append(f"axis{self.axis}")
        default_sym = self.signed
        if self.symmetric != default_sym:
            parts.append("sym" if self.symmetric else "asym")
        if self.dynamic and self.granularity != "token":
            parts.append("dynamic")
        if self.observer != "minmax":
            parts.append(self.observer)
        return "/".join(parts)

    def __repr__(self) -> str:
        return f"QSpec('{self}')"


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (which are widened to include 0)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        if spec.signed:
            scale = (amax / spec.qmax).clamp_min(eps)
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:  # symmetric around the middle of an unsigned range
            scale = (2 * amax / (spec.qmax - spec.qmin)).clamp_min(eps)
            zp = torch.full_like(scale, (spec.qmax + spec.qmin + 1) // 2, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps)
        zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zp


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             group_size: int = 0) -> torch.Tensor:
    """``clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)`` as int8 (signed ranges) or uint8.

    The float32 reciprocal (not a division) is what fbgemm's kernels use, so the
    simulation rounds exactly like them.

    ``scale``/``zero_point`` broadcast against ``x``; with ``group_size > 0`` they have
    shape ``[..., K // group_size]`` and apply to groups of the last dimension.
    """
    dtype = torch.int8 if qmin < 0 else torch.uint8
    inv = 1.0 / scale.float()  # multiply by the float32 reciprocal, as fbgemm's vectorized quantize does
    if group_size > 0:
        q = torch.round(_grouped(x, group_size) * inv.unsqueeze(-1)) + zero_point.unsqueeze(-1)
        return q.clamp_(qmin, qmax).reshape(x.shape).to(dtype)
    return (torch.round(x * inv) + zero_point).clamp_(qmin, qmax).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``dtype``."""
    if group_size > 0:
        x = (_grouped(q, group_size).to(dtype) - zero_point.unsqueeze(-1).to(dtype)) * scale.unsqueeze(-1).to(dtype)
        return x.reshape(q.shape)
    return (q.to(dtype) - zero_point.to(dtype)) * scale.to(dtype)

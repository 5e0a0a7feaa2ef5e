"""What this CPU offers for int8, and which code ranges make each kernel exact.

Why this exists: on x86 CPUs without VNNI, fbgemm's and oneDNN's u8 x s8 GEMMs multiply
with ``vpmaddubsw``, which adds *two* u8*s8 products into a **saturating int16** before
widening to int32. With full-range activation codes (0..255) and int8 weights (-127..127)
the pair sum reaches 2*255*127 = 64770 > 32767, so results are silently wrong for some
inputs. Narrowing either side by one bit makes the arithmetic exact for *every* input:
7-bit weights (-63..63: 2*255*63 = 32130) or 7-bit activation codes (0..127, PyTorch's
``reduce_range``: 2*127*128 = 32512). VNNI (``vpdpbusd``) and AMX accumulate in int32 and
are exact at 8 bits on both sides.

Measured on the pretrained MiniLM (``bench/quant.py``, min cosine over 64 sentences), the
weights lose less than the activations from the missing bit (dynamic int8: 0.9972 with
7-bit weights against 0.9953 with 7-bit activations; static: 0.988 against 0.964), so
that is fxopt's choice where a CPU saturates.

The plan is decided per engine and layer shape, by construction rather than by a spot
check of the user's data:

1. :func:`cpu_info` reads the CPU's flags (``/proc/cpuinfo`` on Linux) and torch's
   quantized engines, for reports;
2. :func:`exact_bits` *measures* each engine once per process and layer shape with a
   probe whose codes are all at their extremes: 8 when full-range activation codes sum
   exactly with weights of the given width, 7 when only 7-bit codes do, 0 when the engine
   is missing or wrong even then (fbgemm's depthwise kernels saturate even with VNNI);
3. :func:`int8_plan` is what ``insert-qdq`` simulates (``reduce_range='auto'``): 8-bit
   codes and weights where an engine is exact with them, else 7-bit weights. The kernels in
   :mod:`fxopt.kernels.cpu_quant` check at run time that the engine they call is exact for
   the codes and weights the layer was quantized with, and otherwise take an exact slower
   path (a model quantized on a VNNI machine and loaded on an AVX2 one stays correct).

One debug switch, ``FXOPT_CPU_ISA``, forces a plan so that both paths run on any machine:

* ``FXOPT_CPU_ISA=avx2``: plan as on a CPU without VNNI (7-bit weights), and (when set
  before fbgemm and oneDNN are first used, e.g. in the environment of the process) make
  fbgemm and oneDNN take their AVX2 code paths (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``), so a VNNI machine runs the real saturating kernels;
* ``FXOPT_CPU_ISA=vnni``: plan 8-bit codes and weights even where the kernels saturate;
  the kernels then use their exact fallback (what a VNNI-quantized model loaded here does);
* unset or ``auto``: measure.

Tests force a plan in-process with :func:`forced`. Example::

    >>> from fxopt.kernels import cpu_isa
    >>> cpu_isa.int8_plan("linear") in ((8, 8), (8, 7))
    True
    >>> with cpu_isa.forced("avx2"):
    ...     cpu_isa.int8_plan("linear")
    (8, 7)
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

__all__ = ["CpuInfo", "cpu_info", "exact_bits", "int8_plan", "activation_bits", "weight_max", "plan", "forced", "forced_isa", "conv_shape",
           "quantized_engine", "SAMPLE_LAYERS", "dot_products_exact",
           "ENGINES", "KINDS", "DEBUG_SWITCH"]

DEBUG_SWITCH = "FXOPT_CPU_ISA"
ENGINES = ("fbgemm", "onednn")
KINDS = ("linear", "conv")
_FORCED_VALUES = ("auto", "avx2", "vnni")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as fxopt sees it: architecture, ISA name, relevant flags, torch's engines."""

    arch: str
    isa: str                      # "avx512-vnni", "avx-vnni", "avx512", "avx2", "arm64-dotprod", ...
    flags: tuple = ()
    torch_capability: str = ""
    quantized_engines: tuple = ()
    forced: str | None = None
    exact: dict = field(default_factory=dict)   # "engine/layer" -> exact activation bits with 8-bit weights
    exact_w7: dict = field(default_factory=dict)  # ... with 7-bit weights

    def describe(self) -> str:
        def one(k: str, v: int) -> str:
            w7 = self.exact_w7.get(k)
            return f"{k} {v}-bit" + (f" ({w7}-bit with 7-bit weights)" if v < 8 and w7 and w7 > v else "")
        bits = ", ".join(one(k, v) for k, v in sorted(self.exact.items())) or "not probed"
        force = f", forced by {DEBUG_SWITCH}={self.forced}" if self.forced else ""
        return f"{self.isa} ({self.arch}; torch {self.torch_capability or '?'}{force}); exact int8 codes: {bits}"


_INTERESTING = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile",
                "avx512_bf16", "asimd", "asimddp", "i8mm", "sve")


def _read_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_name(arch: str, flags: set[str], capability: str) -> str:
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if "avx512_vnni" in flags:
            return "avx512-vnni"
        if "avx_vnni" in flags:
            return "avx-vnni"
        if "avx512f" in flags or capability.startswith("AVX512"):
            return "avx512"
        if "avx2" in flags or capability == "AVX2":
            return "avx2"
        return "x86"
    if arch in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return arch or "unknown"


def _forced_value() -> str | None:
    value = _FORCE_STACK[-1] if _FORCE_STACK else os.environ.get(DEBUG_SWITCH, "").strip().lower() or None
    if value in (None, "auto"):
        return None
    if value not in _FORCED_VALUES:
        warnings.warn(f"{DEBUG_SWITCH}={value!r} is not one of {', '.join(_FORCED_VALUES)}; ignoring it",
                      stacklevel=3)
        return None
    return value


_FORCE_STACK: list[str] = []


def forced_isa() -> str | None:
    """The forced plan (``'avx2'``, ``'vnni'``) or None when the CPU is measured."""
    return _forced_value()


@contextlib.contextmanager
def forced(value: str) -> Iterator[None]:
    """Plan as if the CPU were ``value`` (``'avx2'``: 7-bit weights; ``'vnni'``: 8-bit everything) inside the block.

    Only the plan changes: the kernels still run what this CPU runs, with their exact fallback
    where the plan's codes would saturate them.
    """
    if value not in _FORCED_VALUES:
        raise ValueError(f"forced() takes one of {_FORCED_VALUES}, got {value!r}")
    _FORCE_STACK.append(value)
    try:
        yield
    finally:
        _FORCE_STACK.pop()


def _apply_env_switch() -> None:
    """``FXOPT_CPU_ISA=avx2`` in the environment: make the libraries take their AVX2 paths too.

    fbgemm and oneDNN read these variables once, when first used; if they were used before
    fxopt was imported, the probe below still reports what they really do.
    """
    if os.environ.get(DEBUG_SWITCH, "").strip().lower() == "avx2":
        os.environ.setdefault("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


_apply_env_switch()


# ---------------------------------------------------------------- probes
def _per_channel(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(w, torch.ones(w.shape[0], dtype=torch.double),
                                                        torch.zeros(w.shape[0], dtype=torch.long), 0)


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Temporarily select torch's quantized engine (prepacking follows it), restoring the user's choice."""
    old = torch.backends.quantized.engine
    if old != name:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        if torch.backends.quantized.engine != old:
            torch.backends.quantized.engine = old


def _linear_once(engine: str, codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if engine == "fbgemm":
        with quantized_engine("fbgemm"):
            packed = torch.ops.quantized.linear_prepack(_per_channel(w), None)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes.float(), 1.0, 0, packed)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    n = w.shape[0]
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.long),
                                              None, 1.0, 0, torch.float32, "none", [], "")


def _conv_once(engine: str, codes: torch.Tensor, w: torch.Tensor, conv: tuple, scale: float) -> torch.Tensor:
    """Conv sums of ``codes`` (uint8) with ``w`` (int8), requantized with ``scale`` (kept in range)."""
    stride, padding, dilation, groups = (list(conv[0]), list(conv[1]), list(conv[2]), conv[3])
    with warnings.catch_warnings():  # fbgemm and oneDNN alike, through torch's quantized-tensor API
        warnings.simplefilter("ignore")
        xq = torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)
        with quantized_engine(engine):
            packed = torch.ops.quantized.conv2d_prepack(_per_channel(w), None, stride, padding, dilation, groups)
            return torch.ops.quantized.conv2d(xq, packed, scale, 0).int_repr().float() * scale


def _exact_at(engine: str, kind: str, shape: tuple, top: int, wtop: int) -> bool:
    """Is ``engine`` exact for layer ``shape`` with every activation code at ``top`` and weights at +-``wtop``?

    Every pair of products is at its extreme, so a kernel that sums pairs into a saturating
    int16 is caught whatever pairs it forms; the layer's own shape makes the library take the
    same code path (fbgemm has special kernels for depthwise and small-group convolutions).
    """
    if kind == "linear":
        n, k = shape
        w = torch.full((min(n, 64), k), wtop, dtype=torch.int8)
        w[1::2] = -wtop
        codes = torch.full((3, k), top, dtype=torch.uint8)
        return bool(torch.equal(_linear_once(engine, codes, w), codes.float() @ w.float().t()))
    w_shape, conv = shape[0], shape[1:5]
    w = torch.full(w_shape, wtop, dtype=torch.int8)  # positive: requantized outputs keep the sums
    side = max(w_shape[2] * conv[2][0], w_shape[3] * conv[2][1]) + 2 * max(conv[0]) + 1
    codes = torch.full((1, w_shape[1] * conv[3], side, side), top, dtype=torch.uint8)
    want = torch.nn.functional.conv2d(codes.float(), w.float(), None, *conv)
    # the engines requantize conv outputs: map the largest sum to code ~250; saturation is far off
    scale = float(top) * wtop * w[0].numel() / 250
    got = _conv_once(engine, codes, w, conv, scale)
    return bool(((got - want).abs() <= scale * 0.51 + 1e-3).all())


def weight_max(weight_bits: int) -> int:
    """The largest weight code of a symmetric ``weight_bits``-wide spec: 127 for 8, 63 for 7."""
    return 2 ** (weight_bits - 1) - 1


def _available(engine: str) -> bool:
    if engine == "fbgemm":
        return "fbgemm" in torch.backends.quantized.supported_engines
    # linears call torch.ops.onednn directly, convs go through torch's "onednn" quantized engine
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and "onednn" in torch.backends.quantized.supported_engines


@functools.lru_cache(maxsize=None)
def _measured_bits(engine: str, kind: str, shape: tuple, weight_bits: int = 8) -> int:
    if not _available(engine):
        return 0
    wtop = weight_max(weight_bits)
    try:
        if _exact_at(engine, kind, shape, 255, wtop):
            return 8
        if _exact_at(engine, kind, shape, 127, wtop):
            return 7
    except Exception:  # noqa: BLE001 - an engine this build cannot run is simply not used
        return 0
    return 0


#: the layer shapes cpu_info() reports: a linear, a 3x3 conv, a 3x3 depthwise conv
SAMPLE_LAYERS = _SAMPLES = {"linear": ("linear", (64, 67)),
            "conv3x3": ("conv", ((16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)),
            "depthwise3x3": ("conv", ((16, 1, 3, 3), (1, 1), (1, 1), (1, 1), 16))}


def conv_shape(w_shape: Any, stride: Any, padding: Any, dilation: Any, groups: int) -> tuple:
    """The probe key of a conv layer: weight shape, stride, padding, dilation, groups."""
    pair = lambda v: tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v), int(v))  # noqa: E731
    return (tuple(int(i) for i in w_shape), pair(stride), pair(padding), pair(dilation), int(groups))


def exact_bits(engine: str, kind: str = "linear", shape: tuple | None = None, weight_bits: int = 8) -> int:
    """Widest activation codes (8 or 7 bits) ``engine`` sums exactly here with ``weight_bits``-wide weights; 0 if
    unusable.

    ``kind`` is ``linear`` (``shape`` = ``(out_features, in_features)``) or ``conv`` (``shape``
    from :func:`conv_shape`). Measured once per engine, kind, shape and weight width in a
    process, on this CPU; the debug switch does not change it.
    """
    if engine not in ENGINES or kind not in KINDS:
        raise ValueError(f"exact_bits(engine in {ENGINES}, kind in {KINDS}), got {engine!r}, {kind!r}")
    if shape is None:
        shape = _SAMPLES["linear" if kind == "linear" else "conv3x3"][1]
    return _measured_bits(engine, kind, tuple(shape), 8 if weight_bits > 7 else 7)


def int8_plan(kind: str = "linear", shape: tuple | None = None) -> tuple[int, int]:
    """``(activation bits, weight bits)`` ``insert-qdq`` uses for an int8 layer on this CPU.

    (8, 8) where an engine sums full-range codes exactly; else (8, 7): 7-bit weights, which
    cost less accuracy than 7-bit activations (see the module docs); (7, 8) only if no engine
    is exact with 7-bit weights either.
    """
    force = _forced_value()
    if force == "avx2":
        return (8, 7)
    if force == "vnni":
        return (8, 8)
    if any(exact_bits(e, kind, shape) >= 8 for e in ENGINES):
        return (8, 8)
    if any(exact_bits(e, kind, shape, 7) >= 8 for e in ENGINES):
        return (8, 7)
    return (7, 8)


def activation_bits(kind: str = "linear", shape: tuple | None = None) -> int:
    """The activation code width of :func:`int8_plan` (8 or 7)."""
    return int8_plan(kind, shape)[0]


@functools.lru_cache(maxsize=4096)  # called by every int8 kernel call: one dict lookup after the first
def plan(kind: str, bits: int, preferred: str = "", shape: tuple | None = None, weight_bits: int = 8) -> str | None:
    """The engine to run an int8 layer whose activation codes are ``bits`` and weights ``weight_bits`` wide,
    or None (exact fallback).

    ``preferred`` (the engine recorded at lowering) wins when it is exact for those codes here.
    """
    order = [preferred] if preferred in ENGINES else []
    order += [e for e in ENGINES if e not in order]
    for e in order:
        if exact_bits(e, kind, shape, weight_bits) >= bits:
            return e
    return None


def dot_products_exact() -> bool:
    """Do other runtimes' int8 kernels (ONNX Runtime, OpenVINO) sum full-range u8 x s8 products exactly here?

    On x86 that takes VNNI or AMX (int32 accumulation); without them both runtimes multiply with
    ``vpmaddubsw``, whose saturating int16 pair sums are wrong for 8-bit codes times 8-bit weights
    (measured on an AVX2 EPYC: ONNX Runtime's ``MatMulInteger`` and QDQ convs, OpenVINO's QDQ convs,
    off by up to 99 output steps; their u8 x u8 kernels widen to int16 first and are exact). Arm's
    kernels widen or use dot products that accumulate in int32. ``FXOPT_CPU_ISA=avx2`` says no.
    Unlike the fbgemm/oneDNN plan this is read from the CPU's flags: those runtimes are not probed.
    """
    if _forced_value() == "avx2":
        return False
    arch, _, flags, _, _ = _static_info()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
    return True


@functools.lru_cache(maxsize=1)
def _static_info() -> tuple[str, str, tuple, str, tuple]:
    arch = platform.machine().lower()
    flags = _read_flags()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        capability = ""
    return (arch, _isa_name(arch, flags, capability), tuple(sorted(f for f in flags if f in _INTERESTING)),
            capability, tuple(torch.backends.quantized.supported_engines))


def cpu_info(probe: bool = True) -> CpuInfo:
    """This CPU's ISA, flags and engines; with ``probe`` also each engine's exact code width."""
    arch, isa, flags, capability, engines = _static_info()
    exact = ({f"{e}/{name}": exact_bits(e, *_SAMPLES[name]) for e in ENGINES for name in _SAMPLES}
             if probe else {})
    exact_w7 = ({f"{e}/{name}": exact_bits(e, *_SAMPLES[name], 7) for e in ENGINES for name in _SAMPLES}
                if probe else {})
    return CpuInfo(arch, isa, flags, capability, engines, _forced_value(), exact, exact_w7)

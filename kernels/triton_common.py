"""What the GPU kernel families share: Triton's availability, tile configs, timing, shape buckets.

The Triton kernels of :mod:`fxopt.kernels.triton_int8`, :mod:`~fxopt.kernels.triton_wq` and
:mod:`~fxopt.kernels.triton_sparse` run compiled on CUDA tensors, and under Triton's
interpreter (``TRITON_INTERPRET=1`` in the environment before the kernels are imported) on
CPU tensors, which is how the tests check them on machines without a GPU. Without Triton, or
on CPU tensors outside the interpreter, each op computes its pure-torch reference, so a graph
lowered for a GPU still loads and runs anywhere (slowly, and exactly as specified).

Tile configs come from one function per kind of work (:func:`matmul_configs`): a
compute-bound list (large tiles, deep pipelines) and an IO-bound list (small M, split-K),
pruned by a cost estimate (tiles that waste more than half their work on padding, or that
leave most of the device's SMs idle without splitting K, are dropped) and then timed once per
shape bucket on the device (:func:`autotune`); the interpreter takes the first config left.

    >>> from fxopt.kernels.triton_common import m_bucket, BUCKETS
    >>> [m_bucket(m) for m in (1, 7, 16, 17, 4096)]
    [0, 1, 1, 2, 3]
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

try:  # Triton is the `gpu` extra (and ships with torch's Linux wheels); fxopt works on CPU without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on the torch 2.13 CPU install, which has no Triton
    triton = tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "INTERPRET", "runs_triton", "tile_offsets", "BUCKETS", "m_bucket", "bucket_rows", "TileConfig",
           "matmul_configs", "autotune", "time_call", "PLAN_CHOICES", "parse_plan", "device_peak"]

#: the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when they were imported)
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: upper bounds of the row-count (M = batch x tokens) buckets a lowered layer plans for: 1, 2-16, 17-128, more
BUCKETS = (1, 16, 128, None)
#: a representative M per bucket, for timing the candidates of a bucket
BUCKET_ROWS = (1, 16, 128, 2048)
#: what a bucket of a lowered layer's plan may say: the Triton kernel, torch's own int8 GEMM (cuBLAS) with the
#: same epilogue, or the layer's float form
PLAN_CHOICES = ("triton", "int_mm", "float")


if HAS_TRITON:
    @triton.jit
    def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The row and column offsets of program ``pid``'s output tile, in grouped launch order (GROUP_M
        neighbouring programs walk down one column of tiles, so they share the weight tiles in L2)."""
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
else:  # pragma: no cover
    tile_offsets = None


def runs_triton(t: torch.Tensor) -> bool:
    """Will the Triton kernels run for tensors like ``t`` (compiled on CUDA, interpreted on CPU)?"""
    if not HAS_TRITON:
        return False
    return t.device.type == "cpu" if INTERPRET else t.device.type == "cuda"


def m_bucket(m: int) -> int:
    """The index in :data:`BUCKETS` of a layer call with ``m`` rows."""
    for i, top in enumerate(BUCKETS):
        if top is None or m <= top:
            return i
    return len(BUCKETS) - 1


def bucket_rows(i: int) -> int:
    return BUCKET_ROWS[i]


def parse_plan(plan: str, op: str, choices: tuple = PLAN_CHOICES) -> tuple[str, ...]:
    """``"triton,triton,int_mm,float"`` -> one choice per bucket (a single word applies to all)."""
    parts = tuple(p.strip() for p in plan.split(",")) if plan else ("triton",)
    if len(parts) == 1:
        parts = parts * len(BUCKETS)
    if len(parts) != len(BUCKETS) or any(p not in choices for p in parts):
        raise ValueError(f"{op}: plan {plan!r} must name one of {', '.join(choices)} for each of the "
                         f"{len(BUCKETS)} row buckets (M <= 1, <= 16, <= 128, more), comma-separated")
    return parts


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def launch(self) -> dict[str, Any]:
        """The keyword arguments of a kernel launch (interpreted kernels take no warps or stages)."""
        kw = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPLIT_K=self.split_k,
                  GROUP_M=self.group_m)
        if not INTERPRET:
            kw.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return kw


_COMPUTE = [TileConfig(128, 256, 64, 1, 8, 3), TileConfig(256, 128, 64, 1, 8, 3), TileConfig(128, 128, 64, 1, 4, 4),
            TileConfig(128, 128, 128, 1, 8, 3), TileConfig(64, 128, 64, 1, 4, 4), TileConfig(128, 64, 64, 1, 4, 4)]
_IO = [TileConfig(16, 64, 128, 1, 4, 4), TileConfig(16, 128, 128, 1, 4, 4), TileConfig(16, 64, 256, 1, 4, 3),
       TileConfig(32, 64, 128, 1, 4, 4), TileConfig(16, 64, 128, 4, 4, 4), TileConfig(16, 128, 128, 8, 4, 4),
       TileConfig(16, 64, 256, 16, 4, 3), TileConfig(32, 128, 128, 4, 4, 4), TileConfig(64, 64, 128, 2, 4, 4)]
#: the interpreter's tiles: small, so the tests' odd shapes cross tile edges in every dimension
_INTERPRETED = [TileConfig(16, 16, 32, 1), TileConfig(16, 16, 32, 3)]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def matmul_configs(m: int, n: int, k: int, min_k: int = 16, device: torch.device | None = None,
                   split_k: bool = True) -> list[TileConfig]:
    """The tile configs worth timing for an ``m x k @ k x n`` product, best guesses first.

    Compute-bound list for large M, IO-bound list (small M tiles, split-K) for small M; the
    cost estimate drops tiles whose padding wastes more than half their work and, without
    split-K, tiles that would leave most SMs idle while K is long.
    """
    if INTERPRET:
        return [c for c in _INTERPRETED if split_k or c.split_k == 1]
    sms = _sm_count(device.index or 0) if device is not None and device.type == "cuda" else 132
    cands = (_IO if m <= 64 else []) + (_COMPUTE if m > 16 else [])
    kept = []
    for c in cands:
        if c.split_k > 1 and (not split_k or k // c.split_k < max(c.block_k, min_k)):
            continue
        pad = (triton.cdiv(m, c.block_m) * c.block_m) * (triton.cdiv(n, c.block_n) * c.block_n) / max(1, m * n)
        if pad > 2.0 and c.block_m > 16:
            continue
        programs = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) * c.split_k
        if programs < sms // 4 and c.split_k == 1 and k >= 4096 and split_k:
            continue
        kept.append(c)
    return kept or cands[:1]


def time_call(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_TUNED: dict[tuple, TileConfig] = {}  # (kernel, shape bucket, dtypes, options) -> the fastest config, per process


def autotune(key: tuple, configs: list[TileConfig], run: Callable[[TileConfig], Any]) -> TileConfig:
    """The fastest of ``configs`` for ``key`` (timed once per process on the device; the interpreter
    and a single candidate take the first). A config the compiler rejects (shared memory) is skipped."""
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    if INTERPRET or len(configs) == 1:
        _TUNED[key] = configs[0]
        return configs[0]
    best, best_ms, errors = None, float("inf"), []
    for c in configs:
        try:
            ms = time_call(lambda c=c: run(c), reps=10, warmup=2)
        except Exception as e:  # out of resources for this tile on this device: try the next
            errors.append(f"{c}: {e}")
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError("no tile config compiled for " + repr(key) + ":\n" + "\n".join(errors))
    _TUNED[key] = best
    return best


#: dense peaks of the GPUs the benchmark names (bf16 TFLOPS, int8 TOPS, HBM TB/s), from NVIDIA's data sheets
_PEAKS = {"H100": (989.0, 1979.0, 3.35), "H200": (989.0, 1979.0, 4.8), "A100": (312.0, 624.0, 2.0)}


def device_peak(name: str) -> tuple[float, float, float] | None:
    """(bf16 TFLOPS, int8 TOPS, HBM TB/s) of a device by its name (``torch.cuda.get_device_name``), if known."""
    for key, peak in _PEAKS.items():
        if key in name:
            return peak
    return None

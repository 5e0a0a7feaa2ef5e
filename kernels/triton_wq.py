"""Weight-only int8 and group-wise int4 on GPU: the weights are dequantized in registers, never in memory.

What ``lower-quant`` emits on CUDA for ``linear(x, dq(Wq), b)`` (the ``int8-weight`` and
``int4-weight`` recipes): ``fxopt::linear_wq_gpu(x, w_q, w_scale, w_zp, bias, group_size, bits,
plan)`` with the layout fxopt already stores (:func:`fxopt.kernels.cpu_quant.pack_int4`):

* ``bits=8``: int8 codes ``[N, K]``; ``bits=4``: two codes per byte ``[N, K // 2]``, low nibble
  first, each stored as ``code + 8``;
* ``w_scale`` / ``w_zp``: ``[N, 1]`` per channel (``group_size=0``) or ``[N, K // group_size]``.

A weight tile is read as codes, turned into ``(q - zp) * scale`` in float32 and cast to the
activation dtype, exactly the simulation's arithmetic (:func:`linear_wq_gpu_reference`), then
multiplied with float32 accumulation. Two kernels:

* ``_wq_gemv_kernel`` for one row (batch-1 decoding, bandwidth-bound): each program owns a block
  of outputs and a slice of K (split-K), reads its weight bytes once and reduces with vector
  multiply-adds; the slices' float32 partials are summed in a fixed order (deterministic).
* ``_wq_matmul_kernel`` for more rows: tensor-core ``tl.dot`` on the dequantized tile (tf32
  off for float32 activations, as torch's own ``linear``), split-K configs for small M.

``plan`` (per row bucket, see :mod:`fxopt.kernels.triton_int8`) is ``triton`` or ``float`` (the
dequantized weight in the activation dtype and torch's ``linear``).

    >>> import torch, fxopt.kernels.triton_wq as k
    >>> from fxopt.kernels.cpu_quant import pack_int4
    >>> w = pack_int4(torch.randint(-8, 8, (6, 64), dtype=torch.int8))
    >>> s, z = torch.rand(6, 2) * 0.1, torch.zeros(6, 2, dtype=torch.int8)
    >>> x = torch.randn(2, 64)
    >>> y = torch.ops.fxopt.linear_wq_gpu(x, w, s, z, None, 32, 4, "triton")
    >>> bool(torch.allclose(y, k.linear_wq_gpu_reference(x, w, s, z, None, 32, 4), atol=1e-5))
    True
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import custom_op

from fxopt.kernels.cpu_quant import _dequant_weight
from fxopt.kernels.triton_common import (HAS_TRITON, INTERPRET, autotune, m_bucket, matmul_configs, parse_plan,
                                         runs_triton, tile_offsets, TileConfig, tl, triton)

__all__ = ["linear_wq_gpu", "linear_wq_gpu_reference", "wq_matmul", "wq_gemv"]

_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    @triton.jit
    def _load_weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_wn, stride_sn, GROUP,
                          BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dequantized weight tile ``[BLOCK_N, BLOCK_K]`` at columns ``k0..`` (float32): (q - zp) * scale."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        if BITS == 4:
            # two codes per byte (join puts its pair last: lo0, hi0, lo1, ...): byte k // 2, low nibble for even k (k0 is even); each byte loaded once, then split
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            mask_p = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)
            p = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_p[None, :], mask=mask_p, other=136)
            p = p.to(tl.int32)
            q = tl.join((p & 15) - 8, (p >> 4) - 8).reshape(BLOCK_N, BLOCK_K)
        else:
            q = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0)
            q = q.to(tl.int32)
        g = offs_k // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0)
        return (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)

    @triton.jit
    def _wq_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, GROUP,
                        BITS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Partial sums of one row's outputs over one K slice: ``out[split, m, n]`` (float32)."""
        pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0)
            w = _load_weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_wn, stride_sn, GROUP, BITS,
                                  BLOCK_N, BLOCK_K)
            # the weight in the activation dtype first, as the simulation's dq(...).to(x.dtype)
            acc += tl.sum(w.to(x.dtype).to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + (pid_k * M + m).to(tl.int64) * N + offs_n, acc, mask=offs_n < N)

    @triton.jit
    def _wq_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, GROUP,
                          BITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
        """``out[split] = x[:, slice] @ dq(W)[:, slice]^T`` in float32 (one K slice per split)."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        offs_m, offs_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = _load_weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_wn, stride_sn, GROUP, BITS,
                                  BLOCK_N, BLOCK_K).to(x.dtype)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc,
                 mask=mask)


def linear_wq_gpu_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
                            bias: Optional[torch.Tensor], group_size: int, bits: int,
                            plan: str = "triton") -> torch.Tensor:
    """``linear(x, dq(W).to(x.dtype), bias)``: the simulated weight-only layer (and the CPU kernel)."""
    return F.linear(x, _dequant_weight(w_q, w_scale, w_zp, group_size, bits).to(x.dtype), bias)


def _finish(partials: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = partials[0] if partials.shape[0] == 1 else partials.sum(0)  # a fixed order: deterministic
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def _args(w_q, w_scale, w_zp, group_size, bits):
    k = w_q.shape[1] * (2 if bits == 4 else 1)
    group = group_size if group_size > 0 else k
    w_scale = w_scale.reshape(w_q.shape[0], -1).contiguous()
    w_zp = w_zp.reshape(w_q.shape[0], -1).contiguous()
    return k, group, w_scale, w_zp


def wq_gemv(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
            bias: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    """Rows of ``x2`` times the dequantized weight by the GEMV kernel (split-K tuned per shape)."""
    m, n = x2.shape[0], w_q.shape[0]
    k, group, s, z = _args(w_q, w_scale, w_zp, group_size, bits)
    cands = [(64, 64, 1), (64, 128, 1), (32, 256, 1), (64, 128, 4), (32, 256, 8), (128, 64, 4)] if not INTERPRET \
        else [(16, 32, 2)]

    def run(c):
        bn, bk, split = c.block_n, c.block_k, c.split_k
        out = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
        extra = {} if INTERPRET else {"num_warps": 4}
        _wq_gemv_kernel[(triton.cdiv(n, bn), m, split)](x2, w_q, s, z, out, m, n, k, x2.stride(0), w_q.stride(0),
                                                        s.stride(0), group, BITS=bits, SPLIT_K=split, BLOCK_N=bn,
                                                        BLOCK_K=bk, **extra)
        return out
    configs = [TileConfig(1, bn, bk, split) for bn, bk, split in cands if bits != 4 or bk % 2 == 0]
    cfg = autotune(("wq_gemv", m, n, k, bits, group, x2.dtype), configs, run)
    return _finish(run(cfg), bias, x2.dtype)


def wq_matmul(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    """Rows of ``x2`` times the dequantized weight by the tensor-core kernel (tile config tuned per bucket)."""
    m, n = x2.shape[0], w_q.shape[0]
    k, group, s, z = _args(w_q, w_scale, w_zp, group_size, bits)

    def run(c):
        out = torch.empty((c.split_k, m, n), dtype=torch.float32, device=x2.device)
        grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n), c.split_k)
        _wq_matmul_kernel[grid](x2, w_q, s, z, out, m, n, k, x2.stride(0), w_q.stride(0), s.stride(0), group,
                                BITS=bits, IEEE=x2.dtype == torch.float32, **c.launch())
        return out
    cfg = autotune(("wq_matmul", m_bucket(m), n, k, bits, group, x2.dtype),
                   matmul_configs(m, n, k, device=x2.device), run)
    return _finish(run(cfg), bias, x2.dtype)


@custom_op("fxopt::linear_wq_gpu", mutates_args=())
def linear_wq_gpu(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
                  bias: Optional[torch.Tensor], group_size: int, bits: int, plan: str = "triton") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    choice = parse_plan(plan, "linear_wq_gpu")[m_bucket(m)]
    if choice != "triton" or not runs_triton(x2) or x.dtype not in _DOT_DTYPES or m == 0:
        return linear_wq_gpu_reference(x, w_q, w_scale, w_zp, bias, group_size, bits)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    run = wq_gemv if m == 1 else wq_matmul
    return run(x2, w_q, w_scale, w_zp, bias, group_size, bits).reshape(*x.shape[:-1], w_q.shape[0])


@linear_wq_gpu.register_fake
def _(x, w_q, w_scale, w_zp, bias, group_size, bits, plan="triton"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))

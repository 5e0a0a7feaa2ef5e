"""Sparse linears on GPU: 2:4 semi-structured weights and block-sparse (BSR) weights.

What ``lower-sparse`` emits on CUDA (see :mod:`fxopt.passes.lower.rules_cuda`):

* ``fxopt::linear_24_gpu(x, values, meta, bias, plan)`` for a weight ``sparsify-2:4`` left with
  two non-zeros in every four consecutive inputs: ``values [N, K // 2]`` (the kept weights, in
  order) and ``meta [N, K // 4]`` (uint8: the two positions of each group, ``i0 | i1 << 2``), 0.56x
  of the fp16 bytes. The Triton kernel rebuilds each dense weight tile in registers from them and
  runs tensor-core ``tl.dot`` (fp32 accumulation), so it reads half the weight bytes; the plan may
  instead pick torch's semi-structured sparse GEMM (cuSPARSELt / CUTLASS, ``torch24``, fp16 and
  bf16, which uses the sparse tensor cores) or the dense product of the rebuilt weight (``float``),
  whichever ``lower-sparse`` timed fastest for the row bucket.
* ``fxopt::linear_bsr_gpu(x, crow, col, blocks, n, bias, plan)`` for a weight mostly made of zero
  blocks (``magnitude-prune`` at high ratios, ``lower-sparse(max_density=...)``): CSR over
  ``block x block`` tiles (``blocks [nnzb, B, B]``, ``col`` the block column of each, ``crow`` the
  block-row offsets). One program per (row tile, block row) walks that row's blocks only.

Both equal their references (the dense ``linear`` of the same weight) up to float summation
order; without a GPU (and outside Triton's interpreter) they compute the reference.

    >>> import torch, fxopt.kernels.triton_sparse as k
    >>> from fxopt.passes.compress.sparsity import mask_24
    >>> w = torch.randn(8, 16); w = w * mask_24(w)
    >>> values, meta = k.compress_24(w)
    >>> bool(torch.equal(k.decompress_24(values, meta), w))
    True
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.library import custom_op

from fxopt.kernels.triton_common import (HAS_TRITON, INTERPRET, TileConfig, autotune, m_bucket,
                                         parse_plan, runs_triton, tile_offsets, tl, triton)

__all__ = ["compress_24", "decompress_24", "is_24", "to_bsr", "from_bsr", "linear_24_gpu", "linear_24_gpu_reference",
           "linear_bsr_gpu", "linear_bsr_gpu_reference", "SPARSE24_CHOICES"]

#: what a bucket of a 2:4 layer's plan may say
SPARSE24_CHOICES = ("triton", "torch24", "float")


# ---------------------------------------------------------------- formats
def is_24(w: torch.Tensor) -> bool:
    """At most two non-zeros in every group of four consecutive inputs (K a multiple of 4)?"""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight ``[N, K]`` -> (values ``[N, K // 2]``, meta uint8 ``[N, K // 4]``).

    Groups with fewer than two non-zeros keep zeros at the first free positions."""
    if not is_24(w):
        raise ValueError(f"compress_24: the weight {tuple(w.shape)} is not 2:4 sparse (at most 2 non-zeros in "
                         "each 4 consecutive inputs, K a multiple of 4): run sparsify-2:4 first")
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    nz = g != 0
    # the two kept positions of each group: non-zeros first (in order), then zeros to fill
    order = torch.argsort((~nz).to(torch.int8) * 4 + torch.arange(4, device=w.device), dim=-1, stable=True)[..., :2]
    order = order.sort(-1).values
    values = g.gather(-1, order).reshape(n, k // 2).contiguous()
    meta = (order[..., 0] | (order[..., 1] << 2)).to(torch.uint8).contiguous()
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    n, groups = meta.shape
    idx = torch.stack([meta & 3, (meta >> 2) & 3], -1).long()
    dense = torch.zeros(n, groups, 4, dtype=values.dtype, device=values.device)
    return dense.scatter_(-1, idx, values.reshape(n, groups, 2)).reshape(n, groups * 4)


def to_bsr(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight ``[N, K]`` -> (crow int32, col int32, blocks ``[nnzb, block, block]``), zero blocks dropped
    (the edges padded with zeros to whole blocks)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=w.dtype, device=w.device)
    padded[:n, :k] = w
    tiles = padded.reshape(nb, block, kb, block).permute(0, 2, 1, 3)  # [nb, kb, block, block]
    keep = tiles.ne(0).flatten(2).any(-1)
    crow = torch.zeros(nb + 1, dtype=torch.int32, device=w.device)
    crow[1:] = keep.sum(1).cumsum(0).to(torch.int32)
    col = keep.nonzero()[:, 1].to(torch.int32).contiguous()
    return crow, col, tiles[keep].contiguous()


def from_bsr(crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    block = blocks.shape[-1]
    nb, kb = crow.numel() - 1, -(-k // block)
    tiles = torch.zeros(nb, kb, block, block, dtype=blocks.dtype, device=blocks.device)
    rows = torch.repeat_interleave(torch.arange(nb, device=blocks.device), (crow[1:] - crow[:-1]).long())
    tiles[rows, col.long()] = blocks
    return tiles.permute(0, 2, 1, 3).reshape(nb * block, kb * block)[:n, :k]


# ---------------------------------------------------------------- kernels
if HAS_TRITON:
    @triton.jit
    def _sparse24_matmul_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, M, N, K, stride_xm, stride_vn, stride_mn,
                                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
        """``out[split] = x @ W^T`` over one K slice, W's tiles rebuilt from values + meta in registers."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        offs_m, offs_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            offs_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_v[None, :],
                        mask=(offs_n[:, None] < N) & (offs_v[None, :] < K // 2), other=0.0)
            meta = tl.load(meta_ptr + offs_n[:, None].to(tl.int64) * stride_mn + offs_g[None, :],
                           mask=(offs_n[:, None] < N) & (offs_g[None, :] < K // 4), other=0).to(tl.int32)
            v0, v1 = tl.split(v.reshape(BLOCK_N, BLOCK_K // 4, 2))
            i0, i1 = meta & 3, (meta >> 2) & 3
            zero = tl.zeros_like(v0)
            d0 = tl.where(i0 == 0, v0, zero) + tl.where(i1 == 0, v1, zero)
            d1 = tl.where(i0 == 1, v0, zero) + tl.where(i1 == 1, v1, zero)
            d2 = tl.where(i0 == 2, v0, zero) + tl.where(i1 == 2, v1, zero)
            d3 = tl.where(i0 == 3, v0, zero) + tl.where(i1 == 3, v1, zero)
            w = tl.join(tl.join(d0, d2), tl.join(d1, d3)).reshape(BLOCK_N, BLOCK_K).to(x.dtype)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc,
                 mask=mask)

    @triton.jit
    def _bsr_matmul_kernel(x_ptr, crow_ptr, col_ptr, blocks_ptr, out_ptr, M, N, K, stride_xm, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        """One row tile of x times one block row of W: only the stored blocks of that row are read."""
        pid_m, brow = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = tl.arange(0, BLOCK)
        start = tl.load(crow_ptr + brow)
        end = tl.load(crow_ptr + brow + 1)
        acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
        for i in range(start, end):
            bcol = tl.load(col_ptr + i)
            offs_k = bcol * BLOCK + offs_b
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            b = tl.load(blocks_ptr + i * (BLOCK * BLOCK) + offs_b[:, None] * BLOCK + offs_b[None, :])
            if IEEE:
                acc = tl.dot(x, tl.trans(b.to(x.dtype)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(b.to(x.dtype)), acc)
        offs_n = brow * BLOCK + offs_b
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------- launchers and ops
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _finish(partials: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = partials[0] if partials.shape[0] == 1 else partials.sum(0)
    return (out if bias is None else out + bias.float()).to(dtype)


def _configs_24(m: int) -> list[TileConfig]:
    if INTERPRET:
        return [TileConfig(16, 16, 32, 1), TileConfig(16, 16, 32, 2)][:1 if m > 16 else 2]
    small = [TileConfig(16, 64, 128, s, 4, 4) for s in (1, 4, 8)] + [TileConfig(16, 128, 128, 4, 4, 4)]
    large = [TileConfig(128, 128, 64, 1, 8, 3), TileConfig(128, 256, 64, 1, 8, 3), TileConfig(64, 128, 64, 1, 4, 4)]
    return small if m <= 16 else (small[:1] + large if m <= 128 else large)


def sparse24_matmul(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    m, n, k = x2.shape[0], values.shape[0], meta.shape[1] * 4
    values = values.to(x2.dtype)

    def run(c):
        out = torch.empty((c.split_k, m, n), dtype=torch.float32, device=x2.device)
        grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n), c.split_k)
        _sparse24_matmul_kernel[grid](x2, values, meta, out, m, n, k, x2.stride(0), values.stride(0),
                                      meta.stride(0), IEEE=x2.dtype == torch.float32, **c.launch())
        return out
    cfg = autotune(("sparse24", m_bucket(m), n, k, x2.dtype), _configs_24(m), run)
    return _finish(run(cfg), bias, x2.dtype)


_SEMI: dict[int, tuple[Any, int, Any]] = {}


def _semi_structured(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype) -> Any:
    """torch's semi-structured sparse tensor of the weight (cached per values tensor and version)."""
    hit = _SEMI.get(id(values))
    if hit is not None and hit[0]() is values and hit[1] == values._version:
        return hit[2]
    from torch.sparse import to_sparse_semi_structured
    sp = to_sparse_semi_structured(decompress_24(values, meta).to(dtype))
    _SEMI[id(values)] = (weakref.ref(values, lambda _r, k=id(values): _SEMI.pop(k, None)), values._version, sp)
    return sp


def linear_24_gpu_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                            plan: str = "triton") -> torch.Tensor:
    """The dense ``linear`` of the rebuilt 2:4 weight."""
    return F.linear(x, decompress_24(values, meta).to(x.dtype), None if bias is None else bias.to(x.dtype))


@custom_op("fxopt::linear_24_gpu", mutates_args=())
def linear_24_gpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                  plan: str = "triton") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    choice = parse_plan(plan, "linear_24_gpu", SPARSE24_CHOICES)[m_bucket(m)]
    if choice == "torch24" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        out = F.linear(x2, _semi_structured(values, meta, x.dtype), None if bias is None else bias.to(x.dtype))
        return out.reshape(*x.shape[:-1], values.shape[0])
    if choice != "triton" or not runs_triton(x2) or x.dtype not in _DOT_DTYPES or m == 0:
        return linear_24_gpu_reference(x, values, meta, bias)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    return sparse24_matmul(x2, values, meta, bias).reshape(*x.shape[:-1], values.shape[0])


@linear_24_gpu.register_fake
def _(x, values, meta, bias, plan="triton"):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def linear_bsr_gpu_reference(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, n: int,
                             bias: Optional[torch.Tensor], plan: str = "triton") -> torch.Tensor:
    """The dense ``linear`` of the weight the blocks make up."""
    w = from_bsr(crow, col, blocks, n, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def bsr_matmul(x2: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, n: int,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    m, k = x2.shape
    block = blocks.shape[-1]
    out = torch.empty((1, m, n), dtype=torch.float32, device=x2.device)
    configs = [TileConfig(16, block, block)] if INTERPRET else \
        [TileConfig(bm, block, block, 1, 4, 3) for bm in ((16, 32, 64) if m <= 64 else (64, 128))]

    def run(c):
        extra = {} if INTERPRET else {"num_warps": c.num_warps, "num_stages": c.num_stages}
        _bsr_matmul_kernel[(triton.cdiv(m, c.block_m), crow.numel() - 1)](
            x2, crow, col, blocks, out, m, n, k, x2.stride(0), IEEE=x2.dtype == torch.float32,
            BLOCK_M=c.block_m, BLOCK=block, **extra)
        return out
    cfg = autotune(("bsr", m_bucket(m), n, k, block, x2.dtype), configs, run)
    return _finish(run(cfg), bias, x2.dtype)


@custom_op("fxopt::linear_bsr_gpu", mutates_args=())
def linear_bsr_gpu(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, n: int,
                   bias: Optional[torch.Tensor], plan: str = "triton") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    choice = parse_plan(plan, "linear_bsr_gpu")[m_bucket(x2.shape[0])]
    if choice != "triton" or not runs_triton(x2) or x.dtype not in _DOT_DTYPES or x2.shape[0] == 0:
        return linear_bsr_gpu_reference(x, crow, col, blocks, n, bias)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    return bsr_matmul(x2, crow, col, blocks.to(x.dtype), n, bias).reshape(*x.shape[:-1], n)


@linear_bsr_gpu.register_fake
def _(x, crow, col, blocks, n, bias, plan="triton"):
    return x.new_empty((*x.shape[:-1], n))


"""W8A8 on GPU: int8 x int8 -> int32 GEMM with a fused epilogue, and the activation quantizer it reads.

What ``lower-quant`` emits for the int8 QDQ patterns on CUDA (see
:mod:`fxopt.passes.lower.rules_cuda`):

* ``fxopt::linear_int8_dynamic_gpu(x, w_q, w_scale, bias, x_qmax, activation, plan)``: per-token
  symmetric activations. One pass over ``x`` (:func:`quantize_rows`, one program per row)
  writes the int8 codes and each row's scale ``amax|x_row| / qmax`` exactly as the simulation
  computes them (IEEE division, the float32 reciprocal, round half to even); the GEMM
  accumulates in int32 and its epilogue applies row scale x channel scale, bias, the optional
  activation (``relu``, ``gelu``) and the output dtype.
* ``fxopt::linear_int8_gpu(x, w_q, w_scale, bias, x_scale, x_zp, x_qmax, activation, plan)``: a
  static (calibrated) activation grid with unsigned codes ``0..qmax``. The codes are stored
  shifted by -128 (the tensor cores take int8), and the epilogue adds ``(128 - zp) * sum_k w``
  per output channel in int32, so the integer sum is exactly ``sum_k (q - zp) * w``.

``plan`` says, per row-count bucket (:data:`~fxopt.kernels.triton_common.BUCKETS`: M <= 1,
<= 16, <= 128, more), what runs: ``triton`` (this file's GEMM; split-K configs for small M),
``int_mm`` (torch's cuBLAS int8 GEMM, then this file's epilogue), or ``float`` (the layer's
float form: dequantized weights, no activation rounding). ``lower-quant`` writes it from
timings on the device (keep a kernel only where it is faster).

The int32 sum is exact in every path, so the kernels equal their references
(:func:`linear_int8_dynamic_gpu_reference`, the simulated QDQ formula) up to float rounding
of the epilogue, for every input. Without a GPU (and outside Triton's interpreter) the ops
compute the reference.

    >>> import torch, fxopt.kernels.triton_int8 as k
    >>> x, w = torch.randn(3, 64), torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    >>> s = torch.full((5, 1), 0.01)
    >>> y = torch.ops.fxopt.linear_int8_dynamic_gpu(x, w, s, None, 127, "none", "triton")
    >>> bool((y - k.linear_int8_dynamic_gpu_reference(x, w, s, None, 127)).abs().max() < 1e-4)
    True
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.library import custom_op

import fxopt.quant.qops  # noqa: F401  (the references use torch.ops.fxopt.dynamic_scale)
from fxopt.kernels.cpu_quant import linear_int8_dynamic_reference, linear_int8_reference
from fxopt.kernels.triton_common import (HAS_TRITON, autotune, m_bucket, matmul_configs, parse_plan, runs_triton,
                                         tile_offsets, tl, triton)

__all__ = ["quantize_rows", "quantize_rows_reference", "int8_matmul", "int8_matmul_reference",
           "linear_int8_dynamic_gpu", "linear_int8_gpu", "linear_int8_dynamic_gpu_reference",
           "linear_int8_gpu_reference", "ACTIVATIONS", "activation_reference"]

#: the epilogue's activations (codes the kernels take)
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
_EPS = torch.finfo(torch.float32).eps
_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 to an integer, halves to even


def activation_reference(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation != "none":
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return y


# ---------------------------------------------------------------- the kernels
if HAS_TRITON:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, qmax, inv_static, zp_static,
                              eps, DYNAMIC: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row: its scale (dynamic: amax / qmax) and its int8 codes (static: code - 128).

        ``qmax`` and ``zp_static`` come as floats (integer arguments equal to 1 would be specialized)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        if DYNAMIC:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), eps), qmax)
            tl.store(scale_ptr + row, scale)
            inv = tl.math.div_rn(1.0, scale)
            lo = -qmax
            hi = qmax
        else:
            inv = inv_static
            # codes 0..qmax on zero point zp: x / s lies in -zp..qmax - zp before the final clamp
            lo = -zp_static - 1.0
            hi = qmax - zp_static + 1.0
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            # the clamp sits between the product and the rounding add, so the compiler cannot fuse them into
            # one FMA: the simulation rounds x * inv to float32 first, then to an integer
            v = tl.minimum(tl.maximum(x * inv, lo), hi)
            r = (v + 12582912.0) - 12582912.0
            if DYNAMIC:
                code = tl.minimum(tl.maximum(r, -qmax), qmax)
            else:
                code = tl.minimum(tl.maximum(r + zp_static, 0.0), qmax) - 128.0
            tl.store(q_ptr + row * stride_qm + k0 + offs, code.to(tl.int8), mask=mask)

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, stride_rs, col_scale_ptr, bias_ptr, corr_ptr,
                  HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr, ACT: tl.constexpr):
        """int32 sums -> (sum + corr[n]) * row_scale[m] * col_scale[n] + bias[n], then the activation."""
        mask_m, mask_n = offs_m < M, offs_n < N
        if HAS_CORR:
            acc = acc + tl.load(corr_ptr + offs_n, mask=mask_n, other=0)[None, :]
        rs = tl.load(row_scale_ptr + offs_m * stride_rs, mask=mask_m, other=0.0)
        cs = tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * rs[:, None] * cs[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            out = tl.maximum(out, 0.0)
        elif ACT == 2:
            out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
        return out

    @triton.jit
    def _int8_matmul_kernel(
            a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, corr_ptr,
            M, N, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_rs,
            HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
            GROUP_M: tl.constexpr):
        """C = epilogue(A @ B^T) for int8 A [M, K], B [N, K]; with SPLIT_K > 1, int32 partial sums of
        each K slice go to C [SPLIT_K, M, N] instead (:func:`_int8_reduce_kernel` finishes them)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m, offs_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0)
                b = tl.load(b_ptrs, mask=offs_n[None, :] < N, other=0)
            else:
                k_left = K - k0 * BLOCK_K * SPLIT_K
                a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
                b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * SPLIT_K * stride_ak
            b_ptrs += BLOCK_K * SPLIT_K * stride_bk
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            out = _epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, stride_rs, col_scale_ptr, bias_ptr, corr_ptr,
                            HAS_BIAS, HAS_CORR, ACT)
            c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            p_ptrs = c_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=mask)

    @triton.jit
    def _int8_reduce_kernel(p_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, corr_ptr, M, N,
                            stride_cm, stride_cn, stride_rs, SPLITS, HAS_BIAS: tl.constexpr,
                            HAS_CORR: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """Sum SPLITS int32 partials [SPLITS, M, N] (exact, in a fixed order) and apply the epilogue."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        p_ptrs = p_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for s in range(0, SPLITS):
            acc += tl.load(p_ptrs + s * M * N, mask=mask, other=0)
        out = _epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, stride_rs, col_scale_ptr, bias_ptr, corr_ptr,
                        HAS_BIAS, HAS_CORR, ACT)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers
def quantize_rows_reference(x2: torch.Tensor, qmax: int, scale: float | None = None, zp: int = 0):
    """(int8 codes, row scales) as the simulation rounds them: dynamic (``scale=None``: symmetric,
    per row) or static (unsigned codes ``0..qmax`` on ``scale``, ``zp``, stored as code - 128)."""
    from fxopt.quant import qspec
    x2 = x2.float()
    if scale is None:
        s = torch.ops.fxopt.dynamic_scale(x2, qmax)
        return qspec.quantize(x2, s, torch.zeros((), dtype=torch.int32), -qmax, qmax), s.reshape(-1)
    q = qspec.quantize(x2, torch.tensor(float(scale)), torch.tensor(int(zp), dtype=torch.int32), 0, qmax)
    return (q.to(torch.int16) - 128).to(torch.int8), torch.full((x2.shape[0],), float(scale), device=x2.device)


def quantize_rows(x2: torch.Tensor, qmax: int, scale: float | None = None, zp: int = 0):
    """The Triton form of :func:`quantize_rows_reference` (one program per row, one read of the row to
    find its scale and one to write its codes)."""
    if not runs_triton(x2):
        return quantize_rows_reference(x2, qmax, scale, zp)
    m, k = x2.shape
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    dynamic = scale is None
    s = torch.empty((m,), dtype=torch.float32, device=x2.device) if dynamic else \
        torch.full((m,), float(scale), dtype=torch.float32, device=x2.device)
    inv = 0.0 if dynamic else float(1.0 / torch.tensor(float(scale), dtype=torch.float32))
    if m:
        block = min(4096, triton.next_power_of_2(max(k, 16)))
        _quantize_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), float(qmax), inv, float(zp), _EPS,
                                    DYNAMIC=dynamic, BLOCK_K=block)
    return q, s


def int8_matmul_reference(a: torch.Tensor, w_q: torch.Tensor, row_scale: torch.Tensor, w_scale: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, corr: Optional[torch.Tensor] = None,
                          activation: str = "none", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``act((a @ w_q^T + corr) * row_scale[:, None] * w_scale[None, :] + bias)``, the sum in exact integers."""
    acc = a.to(torch.int64) @ w_q.to(torch.int64).t()
    if corr is not None:
        acc = acc + corr.to(torch.int64)
    out = acc.double().float() * row_scale.reshape(-1, 1).float() * w_scale.reshape(1, -1).float()
    if bias is not None:
        out = out + bias.float()
    return activation_reference(out, activation).to(out_dtype)


def _launch_matmul(a, w_q, out, row_scale, stride_rs, w_scale, bias, corr, act, cfg):
    m, k = a.shape
    n = w_q.shape[0]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    target = out if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.int32, device=a.device)
    dummy = w_scale
    _int8_matmul_kernel[grid](
        a, w_q, target, row_scale, w_scale, bias if bias is not None else dummy, corr if corr is not None else dummy,
        m, n, k, a.stride(0), a.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1), stride_rs,
        HAS_BIAS=bias is not None, HAS_CORR=corr is not None, ACT=act,
        EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, **cfg.launch())
    if cfg.split_k > 1:
        _reduce(target, out, row_scale, stride_rs, w_scale, bias, corr, act)
    return out


def _reduce(partials, out, row_scale, stride_rs, w_scale, bias, corr, act):
    splits, m, n = partials.shape
    bm, bn = 16, (32 if triton.next_power_of_2(n) < 64 else 64)
    dummy = w_scale
    _int8_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        partials, out, row_scale, w_scale, bias if bias is not None else dummy, corr if corr is not None else dummy,
        m, n, out.stride(0), out.stride(1), stride_rs, splits, HAS_BIAS=bias is not None,
        HAS_CORR=corr is not None, ACT=act, BLOCK_M=bm, BLOCK_N=bn)
    return out


def int8_matmul(a: torch.Tensor, w_q: torch.Tensor, row_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, corr: Optional[torch.Tensor] = None, activation: str = "none",
                out_dtype: torch.dtype = torch.float32, use_int_mm: bool = False) -> torch.Tensor:
    """The Triton form of :func:`int8_matmul_reference` (tile config tuned per shape bucket; with
    ``use_int_mm``, torch's cuBLAS int8 GEMM makes the int32 sums and this file's epilogue the rest)."""
    if not runs_triton(a):
        return int8_matmul_reference(a, w_q, row_scale, w_scale, bias, corr, activation, out_dtype)
    act = ACTIVATIONS[activation]
    m, k = a.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    row_scale = row_scale.reshape(-1).float()
    stride_rs = 0 if row_scale.numel() == 1 else 1
    w_scale = w_scale.reshape(-1).float().contiguous()
    bias = None if bias is None else bias.contiguous()
    if use_int_mm:
        return _reduce(torch._int_mm(a, w_q.t()).unsqueeze(0), out, row_scale, stride_rs, w_scale, bias, corr, act)
    key = ("int8_matmul", m_bucket(m), n, k, out_dtype, bias is not None, corr is not None, act)
    cfg = autotune(key, matmul_configs(m, n, k, device=a.device),
                   lambda c: _launch_matmul(a, w_q, out, row_scale, stride_rs, w_scale, bias, corr, act, c))
    return _launch_matmul(a, w_q, out, row_scale, stride_rs, w_scale, bias, corr, act, cfg)


# ---------------------------------------------------------------- the ops lower-quant emits
_COLSUMS: dict[int, tuple[Any, int, torch.Tensor]] = {}


def _colsum(w_q: torch.Tensor) -> torch.Tensor:
    """sum_k w_q[n, k] in int32, cached per weight tensor (and its version)."""
    hit = _COLSUMS.get(id(w_q))
    if hit is not None and hit[0]() is w_q and hit[1] == w_q._version:
        return hit[2]
    s = w_q.to(torch.int32).sum(1, dtype=torch.int32)
    _COLSUMS[id(w_q)] = (weakref.ref(w_q, lambda _r, k=id(w_q): _COLSUMS.pop(k, None)), w_q._version, s)
    return s


def _float_form(x, w_q, w_scale, bias, activation):
    w = w_q.to(x.dtype) * w_scale.reshape(-1, 1).to(x.dtype)
    return activation_reference(F.linear(x, w, None if bias is None else bias.to(x.dtype)), activation).float()


def _int_mm_ok(m: int, n: int, k: int) -> bool:
    return m > 16 and n % 8 == 0 and k % 8 == 0


def linear_int8_dynamic_gpu_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                                      bias: Optional[torch.Tensor], x_qmax: int = 127, activation: str = "none",
                                      plan: str = "triton") -> torch.Tensor:
    """The simulated QDQ formula (then the activation): what :func:`linear_int8_dynamic_gpu` computes."""
    return activation_reference(linear_int8_dynamic_reference(x.float(), w_q, w_scale, bias, x_qmax), activation)


def linear_int8_gpu_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                              x_scale: float, x_zp: int, x_qmax: int = 255, activation: str = "none",
                              plan: str = "triton") -> torch.Tensor:
    """The simulated static QDQ formula (then the activation): what :func:`linear_int8_gpu` computes."""
    return activation_reference(linear_int8_reference(x.float(), w_q, w_scale, bias, x_scale, x_zp, x_qmax),
                                activation)


def _run(x, w_q, w_scale, bias, activation, plan, op, scale=None, zp=0, qmax=127):
    x2 = x.reshape(-1, x.shape[-1])
    m, k, n = x2.shape[0], x2.shape[1], w_q.shape[0]
    choice = parse_plan(plan, op)[m_bucket(m)]
    if choice == "float":
        out = _float_form(x2, w_q, w_scale, bias, activation)
    elif not runs_triton(x2):
        return None
    else:
        a, rows = quantize_rows(x2, qmax, scale, zp)
        corr = None if scale is None else (_colsum(w_q) * (128 - int(zp))).to(torch.int32)
        out = int8_matmul(a, w_q, rows, w_scale, bias, corr, activation,
                          use_int_mm=choice == "int_mm" and _int_mm_ok(m, n, k))
    return out.reshape(*x.shape[:-1], n)


@custom_op("fxopt::linear_int8_dynamic_gpu", mutates_args=())
def linear_int8_dynamic_gpu(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                            x_qmax: int = 127, activation: str = "none", plan: str = "triton") -> torch.Tensor:
    out = _run(x, w_q, w_scale, bias, activation, plan, "linear_int8_dynamic_gpu", qmax=x_qmax)
    return out if out is not None else linear_int8_dynamic_gpu_reference(x, w_q, w_scale, bias, x_qmax, activation)


@linear_int8_dynamic_gpu.register_fake
def _(x, w_q, w_scale, bias, x_qmax=127, activation="none", plan="triton"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


@custom_op("fxopt::linear_int8_gpu", mutates_args=())
def linear_int8_gpu(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    x_scale: float, x_zp: int, x_qmax: int = 255, activation: str = "none",
                    plan: str = "triton") -> torch.Tensor:
    out = _run(x, w_q, w_scale, bias, activation, plan, "linear_int8_gpu", x_scale, x_zp, x_qmax)
    return out if out is not None else linear_int8_gpu_reference(x, w_q, w_scale, bias, x_scale, x_zp, x_qmax,
                                                                 activation)


@linear_int8_gpu.register_fake
def _(x, w_q, w_scale, bias, x_scale, x_zp, x_qmax=255, activation="none", plan="triton"):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)

"""An exact model of fbgemm's int8 arithmetic on an x86 CPU without VNNI, for tests on any machine.

Without VNNI, fbgemm (and oneDNN) multiply u8 activation codes by s8 weights with
``vpmaddubsw``: two neighbouring products are added into a *saturating int16*, then pairs
are widened and summed in int32. :func:`saturating_sums` computes exactly that, so a test
can run "the AVX2 kernel" on a VNNI machine: ``emulate_avx2(monkeypatch)`` swaps it in for
fbgemm in the kernels and the probes, and hides oneDNN.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["saturating_sums", "fbgemm_linear", "fbgemm_conv", "emulate_avx2", "fresh_plans"]


def saturating_sums(codes: torch.Tensor, zp: int, w_q: torch.Tensor) -> torch.Tensor:
    """``sum_k (codes - zp) * w`` as vpmaddubsw computes it: [M, K] x [N, K] -> [M, N] (int64)."""
    a, w = codes.to(torch.int64), w_q.to(torch.int64)
    k = a.shape[-1]
    if k % 2:
        a, w = F.pad(a, (0, 1)), F.pad(w, (0, 1))
    prod = a[:, None, :] * w[None, :, :]
    pairs = prod.reshape(*prod.shape[:-1], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1) - zp * w.sum(-1)  # zero-point compensation: exact int32 row offsets


def fbgemm_linear(x2, x_scale, x_zp, w_q, w_scale):
    codes = (torch.round(x2.float() * (1.0 / torch.tensor(float(x_scale)))) + x_zp).clamp(0, 255)
    acc = saturating_sums(codes, int(x_zp), w_q).float()
    return acc * float(x_scale) * w_scale.reshape(1, -1).float()


def fbgemm_conv(xq, w_q, w_scale, bias, conv, out_scale, out_zp, relu, dequantize=False):
    stride, padding, dilation, groups = conv
    codes, zp, scale = xq.int_repr().to(torch.int64), int(xq.q_zero_point()), float(xq.q_scale())
    codes = F.pad(codes, (padding[1], padding[1], padding[0], padding[0]), value=zp)  # padding holds real zeros
    n, cin = codes.shape[:2]
    cout, cpg, kh, kw = w_q.shape
    cols = F.unfold(codes.double(), (kh, kw), dilation=dilation, stride=stride).to(torch.int64)  # [n, cin*kh*kw, L]
    ho = (codes.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (codes.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.empty(n, cout, cols.shape[-1], dtype=torch.int64)
    per = cout // groups
    for g in range(groups):
        block = cols[:, g * cpg * kh * kw:(g + 1) * cpg * kh * kw, :]  # [n, cpg*kh*kw, L]
        wg = w_q[g * per:(g + 1) * per].reshape(per, -1)
        for i in range(n):
            out[i, g * per:(g + 1) * per] = saturating_sums(block[i].t(), zp, wg).t()
    y = out.double() * scale * w_scale.reshape(1, -1, 1).double()
    if bias is not None:
        y = y + bias.reshape(1, -1, 1).double()
    if relu:
        y = y.relu()
    q = (torch.round(y.float() * (1.0 / torch.tensor(float(out_scale)))) + out_zp).clamp(0, 255)
    q = q.to(torch.uint8).reshape(n, cout, ho, wo)
    return (q.float() - out_zp) * float(out_scale) if dequantize else q


def emulate_avx2(monkeypatch) -> None:
    """Make fxopt see (and run) an AVX2 CPU without VNNI: saturating fbgemm, no oneDNN."""
    from fxopt.kernels import cpu_isa, cpu_quant

    def linear_once(engine, codes, w):
        return saturating_sums(codes, 0, w).float()

    def conv_once(engine, codes, w, conv, scale):
        with torch.no_grad():
            xq = torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)
            return fbgemm_conv(xq, w, torch.ones(w.shape[0]), None, conv, scale, 0, False).float() * scale
    monkeypatch.setattr(cpu_quant, "_fbgemm_linear", fbgemm_linear)
    monkeypatch.setattr(cpu_quant, "_fbgemm_conv", fbgemm_conv)
    monkeypatch.setattr(cpu_isa, "_linear_once", linear_once)
    monkeypatch.setattr(cpu_isa, "_conv_once", conv_once)
    monkeypatch.setattr(cpu_isa, "_available", lambda engine: engine == "fbgemm")
    # probes cached for this emulated CPU only; the real cache is untouched
    monkeypatch.setattr(cpu_isa, "_measured_bits", functools.lru_cache(maxsize=None)(cpu_isa._measured_bits.__wrapped__))
    fresh_plans(monkeypatch)


def fresh_plans(monkeypatch) -> None:
    """The kernels cache their engine choice: give a test that changes what the probes say a fresh cache."""
    from fxopt.kernels import cpu_isa
    monkeypatch.setattr(cpu_isa, "plan", functools.lru_cache(maxsize=None)(cpu_isa.plan.__wrapped__))

"""2:4 and block-sparse formats and Triton kernels against the dense linear of the same weight."""
from __future__ import annotations

import pytest
import torch

from fxopt.kernels import triton_sparse as k
from fxopt.passes.compress.sparsity import mask_24

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _w24(n, kk, seed=0):
    w = torch.randn(n, kk, generator=torch.Generator().manual_seed(seed))
    w = w * mask_24(w)
    w[0, :4] = 0  # a group with no non-zero
    if kk >= 8:
        w[-1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with one
    return w


@pytest.mark.parametrize("n, kk", [(1, 4), (6, 64), (37, 36)])
def test_24_format_round_trips(n, kk):
    w = _w24(n, kk)
    values, meta = k.compress_24(w)
    assert values.shape == (n, kk // 2) and meta.shape == (n, kk // 4) and meta.dtype == torch.uint8
    assert torch.equal(k.decompress_24(values, meta), w)


def test_24_format_refuses_other_weights():
    with pytest.raises(ValueError, match="not 2:4 sparse.*sparsify-2:4"):
        k.compress_24(torch.ones(3, 8))
    with pytest.raises(ValueError, match="not 2:4"):
        k.compress_24(torch.zeros(3, 6))


@pytest.mark.parametrize("n, kk, block", [(10, 40, 16), (33, 64, 16), (5, 7, 4), (64, 64, 32)])
def test_bsr_format_round_trips(n, kk, block):
    w = torch.randn(n, kk) * (torch.rand(n, kk) < 0.05)
    crow, col, blocks = k.to_bsr(w, block)
    assert crow.dtype == col.dtype == torch.int32 and blocks.shape[1:] == (block, block)
    assert torch.equal(k.from_bsr(crow, col, blocks, n, kk), w)


triton_only = pytest.mark.skipif(not (k.HAS_TRITON and k.runs_triton(torch.empty(0, device=DEV))),
                                 reason="Triton kernels neither compiled (no GPU) nor interpreted here")


@triton_only
@pytest.mark.parametrize("shape", [(1, 64), (2, 3, 64), (17, 36), (5, 4)])
@pytest.mark.parametrize("n", [1, 37])
def test_24_kernel_matches_the_dense_linear(shape, n):
    w = _w24(n, shape[-1])
    values, meta = k.compress_24(w)
    x, b = torch.randn(*shape), torch.randn(n)
    got = torch.ops.fxopt.linear_24_gpu(x.to(DEV), values.to(DEV), meta.to(DEV), b.to(DEV), "triton")
    torch.testing.assert_close(got.cpu(), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)


@triton_only
@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (33, 64)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3])
def test_bsr_kernel_matches_the_dense_linear(shape, density):
    n, kk = 37, shape[-1]
    w = torch.randn(n, kk) * (torch.rand(n, kk) < density)
    w[:16] = 0  # an empty block row
    crow, col, blocks = k.to_bsr(w, 16)
    x, b = torch.randn(*shape), torch.randn(n)
    got = torch.ops.fxopt.linear_bsr_gpu(x.to(DEV), crow.to(DEV), col.to(DEV), blocks.to(DEV), n, b.to(DEV), "triton")
    torch.testing.assert_close(got.cpu(), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_the_ops_compute_their_reference_without_triton(monkeypatch):
    monkeypatch.setattr(k, "runs_triton", lambda t: False)
    w = _w24(5, 16)
    values, meta = k.compress_24(w)
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.ops.fxopt.linear_24_gpu(x, values, meta, None, "triton"), x @ w.t())
    crow, col, blocks = k.to_bsr(w, 4)
    torch.testing.assert_close(torch.ops.fxopt.linear_bsr_gpu(x, crow, col, blocks, 5, None, "triton"), x @ w.t())
    with pytest.raises(ValueError, match="triton, torch24, float"):
        torch.ops.fxopt.linear_24_gpu(x, values, meta, None, "int_mm")


def test_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 3, 16)
        assert torch.ops.fxopt.linear_24_gpu(x, torch.empty(5, 8), torch.empty(5, 4, dtype=torch.uint8), None,
                                             "triton").shape == (2, 3, 5)
        assert torch.ops.fxopt.linear_bsr_gpu(x, torch.empty(3, dtype=torch.int32), torch.empty(2, dtype=torch.int32),
                                              torch.empty(2, 4, 4), 9, None, "triton").shape == (2, 3, 9)

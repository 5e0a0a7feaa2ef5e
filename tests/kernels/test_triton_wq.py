"""The weight-only int8 / int4 Triton kernels (GEMV for one row, tensor-core GEMM for more) against the reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fxopt.kernels import triton_common as tc  # noqa: E402
from fxopt.kernels import triton_wq as k  # noqa: E402
from fxopt.kernels.cpu_quant import pack_int4  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tc.runs_triton(torch.empty(0, device=DEV)),
                                reason="Triton kernels neither compiled (no GPU) nor interpreted here")


def _weights(n, kk, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, kk), generator=g, dtype=torch.int8)
    q[0, :2] = lo  # the extreme codes
    groups = kk // group if group else 1
    s = torch.rand(n, groups, generator=g) * 0.1 + 1e-3
    z = torch.randint(-3, 4, (n, groups), generator=g, dtype=torch.int8)
    return (pack_int4(q) if bits == 4 else q), s, z


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 16), (4, 0), (8, 0), (8, 16)])
@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (3, 7, 96), (17, 96)])
@pytest.mark.parametrize("n", [1, 37])
def test_weight_only_kernels_match_the_reference(bits, group, shape, n):
    w, s, z = _weights(n, shape[-1], bits, group)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    b = torch.randn(n)
    got = torch.ops.fxopt.linear_wq_gpu(x.to(DEV), w.to(DEV), s.to(DEV), z.to(DEV), b.to(DEV), group, bits, "triton")
    want = k.linear_wq_gpu_reference(x, w, s, z, b, group, bits)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_half_precision_activations(dtype, m):
    if tc.INTERPRET and dtype == torch.bfloat16 and m > 1:
        pytest.skip("Triton 3.8's interpreter casts float32 tiles to bfloat16 wrongly before tl.dot (a 16x16 "
                    "dot is off by 1e10); the compiled kernel runs this case on a GPU")
    w, s, z = _weights(23, 64, 4, 32)
    x = torch.randn(m, 64).to(dtype)
    got = torch.ops.fxopt.linear_wq_gpu(x.to(DEV), w.to(DEV), s.to(DEV), z.to(DEV), None, 32, 4, "triton")
    want = k.linear_wq_gpu_reference(x.float(), w, s, z, None, 32, 4)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), want, atol=2e-2, rtol=2e-2)


def test_odd_k_and_large_values():
    w, s, z = _weights(9, 70, 8, 0)  # K not a multiple of any block
    x = torch.full((1, 70), 1e4)
    got = torch.ops.fxopt.linear_wq_gpu(x.to(DEV), w.to(DEV), s.to(DEV), z.to(DEV), None, 0, 8, "triton")
    torch.testing.assert_close(got.cpu(), k.linear_wq_gpu_reference(x, w, s, z, None, 0, 8), rtol=1e-5, atol=1e-2)


def test_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(2, 3, 64), torch.empty(5, 32, dtype=torch.uint8)
        out = torch.ops.fxopt.linear_wq_gpu(x, w, torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int8), None,
                                            32, 4, "triton")
        assert out.shape == (2, 3, 5)

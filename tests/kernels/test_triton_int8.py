"""The W8A8 Triton kernels against their references: bit-exact codes and int32 sums, every epilogue option.

On a CPU-only machine they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
on a GPU compiled on the device.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fxopt.kernels import triton_common as tc  # noqa: E402
from fxopt.kernels import triton_int8 as k  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tc.runs_triton(torch.empty(0, device=DEV)),
                                reason="Triton kernels neither compiled (no GPU) nor interpreted here")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ties(m: int, k: int, scale: float) -> torch.Tensor:
    """Values at and next to every .5 boundary of the grid (where rounding mistakes show)."""
    half = (torch.arange(m * k, dtype=torch.float32) % 40 - 20 + 0.5) * scale
    pick = torch.arange(m * k) % 3
    x = torch.where(pick == 0, half, torch.where(pick == 1, torch.nextafter(half, half + 1),
                                                 torch.nextafter(half, half - 1)))
    return x.reshape(m, k)


@pytest.mark.parametrize("m, kk", [(1, 1), (1, 33), (5, 70), (3, 300)])
@pytest.mark.parametrize("qmax", [127, 63])
def test_dynamic_codes_and_scales_are_bit_exact(m, kk, qmax):
    x = torch.randn(m, kk, generator=_gen()) * 3
    x[0, 0] = 50.0  # a row scale set by one large value: the ties below sit on its grid
    x = torch.cat([x, _ties(1, kk, 50.0 / qmax), torch.zeros(1, kk), torch.full((1, kk), 3e38)])
    q, s = k.quantize_rows(x.to(DEV), qmax)
    qr, sr = k.quantize_rows_reference(x, qmax)
    assert q.dtype == torch.int8 and torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@pytest.mark.parametrize("scale, zp, qmax", [(0.05, 100, 255), (0.8823862671852112, 169, 255), (0.1, 3, 127),
                                            (1.0, 0, 255), (0.02, 1, 1)])
def test_static_codes_are_bit_exact_at_ties_and_beyond_the_range(scale, zp, qmax):
    x = torch.cat([_ties(4, 37, scale), torch.full((1, 37), 1e30), torch.full((1, 37), -float("inf")),
                   torch.randn(2, 37, generator=_gen()) * 100])
    q, s = k.quantize_rows(x.to(DEV), qmax, scale, zp)
    qr, _ = k.quantize_rows_reference(x, qmax, scale, zp)
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), torch.full((x.shape[0],), float(scale)))


@pytest.mark.parametrize("cfg", [tc.TileConfig(16, 16, 32, 1), tc.TileConfig(16, 16, 32, 3),
                                 tc.TileConfig(32, 16, 64, 2)])
@pytest.mark.parametrize("m, n, kk", [(1, 5, 33), (7, 20, 300), (37, 45, 70)])
def test_int32_sums_are_exact_with_and_without_split_k(cfg, m, n, kk):
    a = torch.randint(-127, 128, (m, kk), generator=_gen(1), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, kk), generator=_gen(2), dtype=torch.int8)
    a[0], w[0] = 127, -127  # the extreme products
    out = torch.empty(m, n, device=DEV)
    one_m, one_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    k._launch_matmul(a.to(DEV), w.to(DEV), out, one_m, 1, one_n, None, None, 0, cfg)
    want = a.long() @ w.long().t()  # |sums| < 2**24: exact in the float32 output
    assert torch.equal(out.cpu().long(), want)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, corr", [(False, False), (True, False), (True, True)])
def test_epilogue_options_match_the_reference(activation, out_dtype, bias, corr):
    m, n, kk = 9, 21, 50
    a = torch.randint(-127, 128, (m, kk), generator=_gen(3), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, kk), generator=_gen(4), dtype=torch.int8)
    rs, ws = torch.rand(m, generator=_gen(5)) * 0.01, torch.rand(n, generator=_gen(6)) * 0.01
    b = torch.randn(n, generator=_gen(7)) if bias else None
    c = torch.randint(-1000, 1000, (n,), generator=_gen(8), dtype=torch.int32) if corr else None
    to = (lambda t: None if t is None else t.to(DEV))
    got = k.int8_matmul(a.to(DEV), w.to(DEV), rs.to(DEV), ws.to(DEV), to(b), to(c), activation, out_dtype)
    want = k.int8_matmul_reference(a, w, rs, ws, b, c, activation, out_dtype)
    assert got.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (17, 33)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("static", [False, True])
def test_the_ops_equal_their_simulated_formula(shape, activation, static):
    kk, n = shape[-1], 19
    x = torch.randn(*shape, generator=_gen(9)) * 2
    w = torch.randint(-127, 128, (n, kk), generator=_gen(10), dtype=torch.int8)
    s, b = torch.rand(n, 1, generator=_gen(11)) * 0.02, torch.randn(n, generator=_gen(12))
    if static:
        args = (b.to(DEV), 0.03, 120, 255, activation)
        got = torch.ops.fxopt.linear_int8_gpu(x.to(DEV), w.to(DEV), s.to(DEV), *args, "triton")
        want = k.linear_int8_gpu_reference(x, w, s, b, 0.03, 120, 255, activation)
    else:
        got = torch.ops.fxopt.linear_int8_dynamic_gpu(x.to(DEV), w.to(DEV), s.to(DEV), b.to(DEV), 127, activation,
                                                      "triton")
        want = k.linear_int8_dynamic_gpu_reference(x, w, s, b, 127, activation)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = float((got.cpu() - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()) + 1e-5


def test_a_float_plan_bucket_runs_the_float_form_and_bad_plans_are_refused():
    x, w, s = torch.randn(1, 16), torch.randint(-127, 128, (4, 16), dtype=torch.int8), torch.rand(4, 1) * 0.01
    got = torch.ops.fxopt.linear_int8_dynamic_gpu(x.to(DEV), w.to(DEV), s.to(DEV), None, 127, "none",
                                                  "float,triton,triton,triton")
    torch.testing.assert_close(got.cpu(), x @ (w.float() * s).t())
    with pytest.raises(ValueError, match="one of triton, int_mm, float for each of the 4 row buckets"):
        torch.ops.fxopt.linear_int8_dynamic_gpu(x, w, s, None, 127, "none", "triton,fast")


def test_without_triton_the_ops_compute_their_reference(monkeypatch):
    monkeypatch.setattr(k, "runs_triton", lambda t: False)
    x, w, s = torch.randn(3, 16), torch.randint(-127, 128, (4, 16), dtype=torch.int8), torch.rand(4, 1) * 0.01
    got = torch.ops.fxopt.linear_int8_dynamic_gpu(x, w, s, None, 127, "relu", "triton")
    assert torch.equal(got, k.linear_int8_dynamic_gpu_reference(x, w, s, None, 127, "relu"))


def test_fake_implementations_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w, s = torch.empty(2, 3, 16), torch.empty(5, 16, dtype=torch.int8), torch.empty(5, 1)
        assert torch.ops.fxopt.linear_int8_dynamic_gpu(x, w, s, None, 127, "none", "triton").shape == (2, 3, 5)
        assert torch.ops.fxopt.linear_int8_gpu(x, w, s, None, 0.1, 3, 255, "none", "triton").shape == (2, 3, 5)


def test_config_lists_and_buckets():
    assert [tc.m_bucket(m) for m in (1, 2, 16, 17, 128, 129, 10**6)] == [0, 1, 1, 2, 2, 3, 3]
    assert tc.parse_plan("float", "op") == ("float",) * 4
    cfgs = tc.matmul_configs(1, 4096, 4096)
    assert cfgs and all(c.block_k % 16 == 0 for c in cfgs)

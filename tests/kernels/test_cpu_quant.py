"""The int8 CPU kernels against their references, on every CPU path and at the edges of their ranges."""
from __future__ import annotations

import pytest
import torch

from avx2_emulation import fbgemm_linear, saturating_sums
from fxopt.kernels import cpu_isa, cpu_quant
from fxopt.kernels.cpu_quant import (conv2d_int8_reference, linear_int8_dynamic_reference, linear_int8_reference)

fxq = torch.ops.fxopt
ENGINES = [e for e in cpu_isa.ENGINES if cpu_isa.exact_bits(e) > 0]


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[0], w[1] = 127, -127  # rows at the extremes: every pair of products saturates with 8-bit codes
    return w, torch.rand(n, 1, generator=g) * 0.01 + 1e-3


def _static_inputs(k, scale, zp, qmax):
    g = torch.Generator().manual_seed(1)
    top = (qmax - zp) * scale
    rows = [torch.full((k,), top), torch.full((k,), -zp * scale), torch.full((k,), top + 1.0),  # beyond the range
            torch.rand(k, generator=g) * top, torch.randn(k, generator=g)]
    return torch.stack(rows)


@pytest.mark.parametrize("qmax, zp", [(255, 3), (127, 0), (127, 70)])
@pytest.mark.parametrize("m, k, n", [(5, 37, 11), (1, 64, 3), (17, 130, 33)])
def test_static_linear_equals_its_reference(cpu_kind, qmax, zp, m, k, n):
    w, ws = _weights(n, k)
    b = torch.randn(n)
    x = torch.cat([_static_inputs(k, 0.05, zp, qmax), torch.randn(m, k)])
    ref = linear_int8_reference(x, w, ws, b, 0.05, zp, qmax)
    for engine in ENGINES:
        out = fxq.linear_int8(x, w, ws, b, 0.05, zp, qmax, engine)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), (cpu_kind, engine)


@pytest.mark.parametrize("qmax", [127, 63])
@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 130), (2, 1, 64)])
def test_dynamic_linear_equals_its_reference(cpu_kind, qmax, shape):
    k = shape[-1]
    w, ws = _weights(9, k)
    x = torch.randn(*shape) * 3
    x.view(-1, k)[0] = 1e4  # a row of equal extremes: every code at +qmax
    x.view(-1, k)[-1, 0] = -7e3  # an outlier: the rest of its row rounds to small codes
    ref = linear_int8_dynamic_reference(x, w, ws, None, qmax)
    for engine in ENGINES:
        out = fxq.linear_int8_dynamic(x, w, ws, None, qmax, engine)
        assert out.shape == (*shape[:-1], 9)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), (cpu_kind, engine)


CONVS = {  # name: (cin, cout, k, stride, padding, dilation, groups)
    "3x3": (8, 16, 3, 1, 1, 1, 1), "depthwise": (16, 16, 3, 1, 1, 1, 16), "depthwise5x5s2": (8, 8, 5, 2, 2, 1, 8),
    "grouped": (8, 12, 3, 1, 1, 1, 2), "strided": (6, 10, 3, 2, 0, 1, 1), "dilated": (4, 6, 3, 1, 2, 2, 1),
    "1x1": (12, 5, 1, 1, 0, 1, 1)}


@pytest.mark.parametrize("qmax", [255, 127])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_equals_its_reference(cpu_kind, qmax, name):
    cin, cout, k, s, p, d, g = CONVS[name]
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-127, 128, (cout, cin // g, k, k), dtype=torch.int8, generator=gen)
    w[0] = 127
    ws, b = torch.rand(cout, generator=gen) * 0.01 + 1e-3, torch.randn(cout, generator=gen)
    x_scale, x_zp = 0.02, 5
    top = (qmax - x_zp) * x_scale
    x = torch.cat([torch.full((1, cin, 9, 9), top), torch.rand(2, cin, 9, 9, generator=gen) * top * 1.2])
    args = (x, w, ws, b, [s, s], [p, p], [d, d], g, x_scale, x_zp, 0.03, 4, name != "1x1", qmax, qmax)
    ref = conv2d_int8_reference(*args)
    for engine in ENGINES:
        out = fxq.conv2d_int8(*args, engine)
        steps = ((out - ref).abs() / 0.03).round()
        # integer sums are exact; the reference sums in float, so a value on a rounding boundary may flip
        assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, (cpu_kind, engine, steps.max())


def test_seven_bit_codes_never_saturate_and_eight_bit_codes_do():
    w = torch.tensor([[127, 127, -127, -127, 127, -127]], dtype=torch.int8)
    exact = lambda c, zp: ((c.long() - zp) @ w.long().t())  # noqa: E731
    for top in (127, 255):
        codes = torch.full((1, 6), top)
        sat = saturating_sums(codes, 0, w)
        assert torch.equal(sat, exact(codes, 0)) == (top == 127)
    # every 7-bit code pattern at the extremes, every sign pattern: 2 * 127 * 128 < 32767
    codes = torch.cartesian_prod(*[torch.tensor([0, 127])] * 4)
    signs = torch.cartesian_prod(*[torch.tensor([-128, 127])] * 4).to(torch.int8)
    assert torch.equal(saturating_sums(codes, 0, signs), codes.long() @ signs.long().t())


def test_the_issue_case_a_saturating_kernel_is_wrong_on_in_range_inputs():
    """On AVX2 without VNNI, 8-bit codes give a wrong answer for ordinary inputs; 7-bit codes do not."""
    torch.manual_seed(0)
    w, ws = _weights(4, 64)
    x = torch.rand(1, 64) * 5  # in range: scale 5/255, codes up to 255
    wrong = fbgemm_linear(x, 5 / 255, 0, w, ws)
    right = linear_int8_reference(x, w, ws, None, 5 / 255, 0, 255)
    assert (wrong - right).abs().max() > 0.1 * right.abs().max()
    x7 = x.clamp(max=127 * 5 / 255)
    assert torch.allclose(fbgemm_linear(x7, 5 / 255, 0, w, ws),
                          linear_int8_reference(x7, w, ws, None, 5 / 255, 0, 127), rtol=1e-5, atol=1e-4)


def test_a_model_planned_for_vnni_runs_exactly_on_avx2_and_says_which_layers_are_slow(monkeypatch):
    import fxopt
    from avx2_emulation import emulate_avx2
    from models import MLP
    torch.manual_seed(0)
    model, x = MLP(40, 24, 6).eval(), torch.randn(8, 40)
    with cpu_isa.forced("vnni"):  # as compiled on a VNNI machine: 8-bit codes
        q = fxopt.compile(model, (x,), recipe="int8-dynamic")
        sim = fxopt.compile(model, (x,), recipe="int8-dynamic", disable=["lower-quant"])
    if cpu_isa.plan("linear", 8, "", (24, 40)) is not None:  # this CPU sums 8-bit codes exactly: no slow path
        assert cpu_quant.fallback_layers(q) == []
    emulate_avx2(monkeypatch)  # ... and run on a CPU without VNNI
    slow = sorted(cpu_quant.fallback_layers(q))
    assert len(slow) == 2 and slow[0].startswith("fc1") and slow[1].startswith("fc2"), slow
    big = torch.randn(6, 40) * 30
    assert (q(big) - sim(big)).abs().max() <= 1e-4 * sim(big).abs().max()


def test_no_exact_engine_at_all_still_computes_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_isa, "exact_bits", lambda engine, kind="linear", shape=None, weight_bits=8: 0)
    from avx2_emulation import fresh_plans
    fresh_plans(monkeypatch)
    w, ws = _weights(6, 40)
    x = torch.randn(4, 40)
    out = fxq.linear_int8_dynamic(x, w, ws, None, 127, "fbgemm")
    assert (out - linear_int8_dynamic_reference(x, w, ws, None, 127)).abs().max() < 1e-4


def test_a_file_saved_with_a_vnni_plan_loads_exact_on_avx2_and_says_so(monkeypatch, tmp_path):
    import fxopt
    from avx2_emulation import emulate_avx2
    from models import MLP
    torch.manual_seed(0)
    model, x = MLP(40, 24, 6).eval(), torch.randn(8, 40)
    calib = [torch.randn(8, 40) for _ in range(2)]
    with cpu_isa.forced("vnni"):
        q = fxopt.compile(model, (x,), recipe="int8", calibration=calib)
        sim = fxopt.compile(model, (x,), recipe="int8", calibration=calib, disable=["lower-quant"])
    fxopt.save(q, tmp_path / "m.fxopt")
    emulate_avx2(monkeypatch)
    with pytest.warns(RuntimeWarning, match="2 int8 layer"):
        loaded = fxopt.load(tmp_path / "m.fxopt")
    big = torch.randn(5, 40) * 20
    assert (loaded(big) - sim(big)).abs().max() <= 1e-4 * sim(big).abs().max()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_many_ordinary_inputs_round_exactly_like_the_simulation(dynamic, fused, monkeypatch):
    """Thousands of random rows put some values within a float ulp of a .5 rounding boundary; the kernels
    must round them as the simulation does (torch 2.13's fbgemm rounds its own input quantization
    differently: there the kernels hand it integers; ``fused=False`` takes that path on any version)."""
    if not fused:
        monkeypatch.setattr(cpu_quant, "fbgemm_rounds_like_the_simulation", lambda: False)
    elif not cpu_quant.fbgemm_rounds_like_the_simulation():
        pytest.skip("this fbgemm rounds differently: the kernels never use its fused quantization here")
    torch.manual_seed(0)
    w, ws = _weights(512, 384)
    x = torch.randn(512, 384) * 3
    for engine in ENGINES:
        if dynamic:
            out, ref = fxq.linear_int8_dynamic(x, w, ws, None, 127, engine), \
                linear_int8_dynamic_reference(x, w, ws, None, 127)
        else:
            out, ref = fxq.linear_int8(x, w, ws, None, 0.037, 131, 255, engine), \
                linear_int8_reference(x, w, ws, None, 0.037, 131, 255)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), engine


def test_the_rounding_probe_tells_the_two_fbgemm_behaviours_apart(monkeypatch):
    """The probe must see the 2.13 behaviour (round(x / s + zp) in float32) wherever it happens."""
    cpu_quant.fbgemm_rounds_like_the_simulation.cache_clear()
    try:
        def adds_zp_first(x2, x_scale, x_zp, w_q, w_scale):
            codes = torch.round(x2.float() * (1.0 / x_scale) + x_zp).clamp(0, 255)  # zp added in float32
            return (codes - x_zp) @ (w_q.float() * w_scale.reshape(-1, 1)).t()
        monkeypatch.setattr(cpu_quant, "_fbgemm_linear", adds_zp_first)
        assert cpu_quant.fbgemm_rounds_like_the_simulation.__wrapped__() is False
    finally:
        cpu_quant.fbgemm_rounds_like_the_simulation.cache_clear()


# ---------------------------------------------------------------- quantize_dequantize, extreme inputs
def _grid_inputs(scale, zp, qmax, seed):
    """Every code, the ties halfway between codes, far beyond the range, infinities, random values."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(-zp - 40, qmax - zp + 41, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    return torch.cat([codes * s, (codes + 0.5) * s, (codes - 0.5) * s, torch.randn(500, generator=g) * s * qmax,
                      torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 1e12, -1e12, 0.0, -0.0, 1e-45])])


@pytest.mark.parametrize("torch_rounds", [True, False])
@pytest.mark.parametrize("qmax", [255, 127, 63, 1])
def test_quantize_dequantize_equals_the_simulation_value_for_value(qmax, torch_rounds, monkeypatch):
    """Both paths: torch's vectorized quantize where it rounds like the simulation (probed), else the
    reference (torch 2.13 rounds ``x / s + zp`` in float32, a code off next to ties)."""
    from fxopt.kernels.cpu_quant import quantize_dequantize_reference
    if not torch_rounds:
        monkeypatch.setattr(cpu_quant, "torch_quantize_rounds_like_the_simulation", lambda: False)
    elif not cpu_quant.torch_quantize_rounds_like_the_simulation():
        pytest.skip("this torch's quantize_per_tensor rounds differently: the kernel never uses it here")
    g = torch.Generator().manual_seed(qmax)
    for trial in range(40):
        scale = float(torch.empty(1).uniform_(-14, 4, generator=g).exp2())
        zp = int(torch.randint(0, qmax + 1, (1,), generator=g))
        x = _grid_inputs(scale, zp, qmax, trial)
        got, want = fxq.quantize_dequantize(x, scale, zp, qmax), quantize_dequantize_reference(x, scale, zp, qmax)
        assert torch.equal(got, want), (scale, zp, qmax, x[got != want][:4], got[got != want][:4])
    # shapes and layouts it is handed in graphs: a channels-last 4-D tensor, a non-contiguous view
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last) * 3
    assert torch.equal(fxq.quantize_dequantize(x, 0.03, 7, qmax), quantize_dequantize_reference(x, 0.03, 7, qmax))
    xt = torch.randn(6, 9).t()
    assert torch.equal(fxq.quantize_dequantize(xt, 0.05, 0, qmax), quantize_dequantize_reference(xt, 0.05, 0, qmax))


def test_quantize_dequantize_outside_its_fast_path_is_the_reference():
    from fxopt.kernels.cpu_quant import quantize_dequantize_reference
    x = torch.randn(64, dtype=torch.float64) * 4
    assert torch.equal(fxq.quantize_dequantize(x, 0.05, 3, 255), quantize_dequantize_reference(x, 0.05, 3, 255))
    xh = torch.randn(64).to(torch.bfloat16)
    assert torch.equal(fxq.quantize_dequantize(xh, 0.05, 3, 255), quantize_dequantize_reference(xh, 0.05, 3, 255))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("zp", [0, 128, 238, 255])
def test_int8_kernels_saturate_like_the_simulation_on_huge_and_infinite_inputs(cpu_kind, engine, zp):
    """Inputs 2**31 steps and more beyond the range (inf, 3e38) once overflowed fbgemm's quantizer to code 0."""
    w, ws = _weights(16, 8)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(zp))
    x[0, 0], x[1, 1], x[2, 2], x[3, 3], x[4, 4], x[5, 5] = float("inf"), 3e38, -3e38, 1e12, -float("inf"), -1e12
    got = fxq.linear_int8(x, w, ws.flatten(), None, 0.0547, zp, 255, engine)
    want = linear_int8_reference(x, w, ws.flatten(), None, 0.0547, zp, 255)
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-5
    wc = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    wcs = torch.rand(4) * 0.01 + 1e-3
    xc = torch.randn(1, 3, 6, 6)
    xc[0, 0, 2, 2], xc[0, 1, 3, 3], xc[0, 2, 1, 1] = float("inf"), 1e12, -float("inf")
    args = (wc, wcs, None, [1, 1], [1, 1], [1, 1], 1, 0.0547, zp, 0.05, 0, False, 255, 255)
    got, want = fxq.conv2d_int8(xc, *args, engine), conv2d_int8_reference(xc, *args)
    assert (got - want).abs().max() <= 2.01 * 0.05


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32), (8, 48)])
def test_linear_wq_reuses_its_weight_buffer_and_stays_exact(bits, group_size):
    """Layers of one shape share a per-thread dequantization buffer: alternating between them, and from two
    threads at once, every call equals the reference (computed on the same thread) bit for bit."""
    import threading
    from fxopt.kernels.cpu_quant import _dequant_weight, pack_int4
    torch.manual_seed(0)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    groups = 96 // group_size if group_size else 1
    layers = []
    for _ in range(2):
        q = torch.randint(lo, hi, (40, 96), dtype=torch.int8)
        layers.append((pack_int4(q) if bits == 4 else q, torch.rand(40, groups) * 0.1,
                       torch.randint(-3, 3, (40, groups), dtype=torch.int32)))
    xs = [torch.randn(6, 96) for _ in range(4)]
    bad = []

    def run():
        # the reference is computed on the thread that checks it: after torch.set_num_threads(1) (as the suite
        # does under xdist) a new thread's BLAS may still split a GEMM differently from the main thread's
        want = [[torch.nn.functional.linear(x, _dequant_weight(*lay, group_size, bits)) for lay in layers]
                for x in xs]
        for _ in range(20):
            for i, x in enumerate(xs):
                for j, lay in enumerate(layers):
                    if not torch.equal(torch.ops.fxopt.linear_wq(x, *lay, None, group_size, bits), want[i][j]):
                        bad.append((i, j))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad

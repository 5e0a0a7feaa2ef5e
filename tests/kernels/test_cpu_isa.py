"""CPU detection, the exactness probes, the debug switch, and the real AVX2 code paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxopt.kernels import cpu_isa


def test_cpu_info_names_the_isa_engines_and_exact_widths():
    info = cpu_isa.cpu_info()
    assert info.isa and info.arch
    text = info.describe()
    for engine in cpu_isa.ENGINES:
        assert f"{engine}/linear" in text
    assert set(info.exact.values()) <= {0, 7, 8}
    if "fbgemm" in torch.backends.quantized.supported_engines:
        assert info.exact["fbgemm/linear"] in (7, 8)  # fbgemm always works with 7-bit codes


def test_the_probe_sees_a_saturating_cpu(monkeypatch):
    from avx2_emulation import emulate_avx2
    emulate_avx2(monkeypatch)
    assert cpu_isa.exact_bits("fbgemm", "linear") == 7
    assert cpu_isa.exact_bits("fbgemm", "conv", cpu_isa.conv_shape((8, 1, 3, 3), 1, 1, 1, 8)) == 7
    assert cpu_isa.exact_bits("fbgemm", "linear", None, 7) == 8  # 7-bit weights: 8-bit codes are exact again
    assert cpu_isa.exact_bits("onednn", "linear") == 0  # hidden by the emulation
    with cpu_isa.forced("auto"):  # measured, whatever FXOPT_CPU_ISA says
        assert cpu_isa.int8_plan("linear") == (8, 7) and cpu_isa.activation_bits("linear") == 8
    assert cpu_isa.plan("linear", 8) is None and cpu_isa.plan("linear", 7) == "fbgemm"
    assert cpu_isa.plan("linear", 8, weight_bits=7) == "fbgemm"


def test_forced_plans_and_the_debug_switch(monkeypatch):
    with cpu_isa.forced("avx2"):
        assert cpu_isa.int8_plan("linear") == (8, 7) and cpu_isa.forced_isa() == "avx2"
        with cpu_isa.forced("vnni"):
            assert cpu_isa.int8_plan("conv") == (8, 8)
    with pytest.raises(ValueError, match="avx2"):
        with cpu_isa.forced("sse"):
            pass
    monkeypatch.setenv(cpu_isa.DEBUG_SWITCH, "avx2")
    assert cpu_isa.int8_plan("linear") == (8, 7) and "forced" in cpu_isa.cpu_info(probe=False).describe()
    monkeypatch.setenv(cpu_isa.DEBUG_SWITCH, "avx9000")
    with pytest.warns(UserWarning, match="FXOPT_CPU_ISA"):
        assert cpu_isa.forced_isa() is None


def test_the_users_quantized_engine_setting_is_left_alone():
    before = torch.backends.quantized.engine
    x = torch.randn(4, 16)
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    torch.ops.fxopt.linear_int8_dynamic(x, w, torch.ones(8, 1) * 0.01, None, 127, "fbgemm")
    assert torch.backends.quantized.engine == before


_REAL_AVX2 = textwrap.dedent("""
    import json, warnings
    import torch, fxopt
    from fxopt.kernels import cpu_isa
    from fxopt.kernels.cpu_quant import REFERENCES
    torch.manual_seed(0)
    out = {"fbgemm_bits": cpu_isa.exact_bits("fbgemm", "linear"), "isa": cpu_isa.cpu_info().describe(),
           "fbgemm_bits_w7": cpu_isa.exact_bits("fbgemm", "linear", None, 7)}
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    x = torch.randn(16, 64)
    big = torch.cat([torch.full((2, 64), 50.0), torch.full((2, 64), -50.0), torch.randn(4, 64) * 20])
    calib = [torch.randn(16, 64) for _ in range(3)]
    for recipe, extra in [("int8-dynamic", {}), ("int8", {"calibration": calib}),
                          ("canonicalize,insert-qdq(reduce_range=activations),lower-quant", {"calibration": calib}),
                          ("canonicalize,insert-qdq(reduce_range=none),lower-quant", {"calibration": calib})]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = fxopt.compile(model, (x,), recipe=recipe, **extra)
            sim = fxopt.compile(model, (x,), recipe=recipe, disable=["lower-quant"], **extra)
            kernels = sum(n.target in REFERENCES for n in q.graph.nodes)
            err = float(((q(big) - sim(big)).abs().max() / sim(big).abs().max()))
        out[recipe] = {"kernels": kernels, "rolled_back": [r.name for r in q.fxopt_history.failures], "err": err}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm is x86 only")
def test_the_real_avx2_kernels_agree_with_the_simulation():
    """FXOPT_CPU_ISA=avx2 makes fbgemm and oneDNN run their AVX2 (saturating) code paths in a fresh process."""
    env = {**os.environ, cpu_isa.DEBUG_SWITCH: "avx2"}
    for var in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-c", _REAL_AVX2], env=env, capture_output=True, text=True, timeout=300)
    line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT")), None)
    assert line is not None, done.stderr[-3000:]
    out = json.loads(line[len("RESULT"):])
    assert out["fbgemm_bits"] == 7, out["isa"]  # the AVX2 kernels saturate 8-bit codes, on any x86 machine
    assert out["fbgemm_bits_w7"] == 8, out["isa"]  # ... unless the weights are 7-bit
    for recipe, r in out.items():
        if isinstance(r, dict) and recipe != "exact":
            assert r["kernels"] == 2 and not r["rolled_back"], (recipe, r)
            assert r["err"] < 1e-4, (recipe, r)

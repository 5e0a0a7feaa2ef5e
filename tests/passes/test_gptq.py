"""The ``gptq`` weight observer (fxopt.quant.gptq) and int4-weight's use of it."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import CalibrationError, PipelineError, RecipeError
from fxopt.quant.gptq import MIN_ROWS_PER_INPUT, HessianObserver, gptq_quantize
from fxopt.quant.observers import weight_qparams
from fxopt.quant.qspec import QSpec, dequantize, quantize
from models import MLP, ResCNN, state_hash

fxq = torch.ops.fxopt


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs on a few directions plus noise: what a layer inside a trained network sees."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(24, d, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 24, generator=g) @ basis + 0.05 * torch.randn(n, d, generator=g)


def _rtn(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    gs = spec.group_size if spec.granularity == "group" else 0
    s, z = weight_qparams(w, spec)
    return dequantize(quantize(w, s, z, spec.qmin, spec.qmax, gs), s, z, gs)


def _compile(model, args, recipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rolled-back pass warns: make it fail the test
        warnings.filterwarnings("ignore", message=".*runs slower than the original.*")
        return fxopt.compile(model, args, recipe=recipe, progress=False, **kw)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _record(gm, name="insert-qdq"):
    return next(r for r in gm.fxopt_history.records if r.name == name)


@pytest.mark.parametrize("spec", ["int4/group32/asym/gptq", "int4/group64/gptq", "int8/channel/gptq",
                                  "uint8/tensor/asym/gptq"])
def test_gptq_moves_the_output_less_than_round_to_nearest_on_unseen_inputs(spec):
    spec = QSpec.parse(spec)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    obs = HessianObserver()
    for i in range(4):
        obs.update(_correlated(256, 128, seed=i))
    codes, scale, zp = gptq_quantize(w, obs.h, spec)
    gs = spec.group_size if spec.granularity == "group" else 0
    # the same layout round-to-nearest gives, codes in range
    s_ref, z_ref = weight_qparams(w, spec)
    assert scale.shape == s_ref.shape and zp.shape == z_ref.shape and codes.dtype == spec.storage
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    x = _correlated(512, 128, seed=10)  # held out
    ref = x @ w.T
    err_gptq = (x @ dequantize(codes, scale, zp, gs).T - ref).pow(2).mean()
    err_rtn = (x @ _rtn(w, spec).T - ref).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn, (float(err_gptq), float(err_rtn))


def test_dead_inputs_and_a_rank_deficient_hessian_stay_finite():
    spec = QSpec.parse("int4/group32/asym/gptq")
    w = torch.randn(16, 64)
    x = _correlated(300, 64, seed=0)
    x[:, 5] = 0.0  # an input that never fires
    x[:, 40:] = x[:, :24]  # duplicated inputs: H is singular without damping
    h = x.double().T @ x.double()
    out = gptq_quantize(w, h, spec)
    assert out is not None
    codes, scale, zp = out
    assert torch.isfinite(dequantize(codes, scale, zp, 32)).all()


def test_huge_weights_are_never_made_worse_than_round_to_nearest():
    torch.manual_seed(0)
    model = MLP(64, 32, 4).eval()
    with torch.no_grad():
        model.fc1.weight.mul_(1e30)  # the output error overflows float32: GPTQ cannot show it is better
    calib = [_correlated(64, 64, seed=s) for s in range(8)]
    gm = _compile(model, (calib[0],), "canonicalize,insert-qdq(weight=int4/group32/asym/gptq,activation=none)",
                  calibration=calib)
    info = _record(gm).info
    assert info["gptq_declined"] >= 1
    rtn = _compile(model, (calib[0],), "canonicalize,insert-qdq(weight=int4/group32/asym/mse,activation=none)")
    assert torch.equal(gm.fc1.weight_q, rtn.fc1.weight_q)  # declined: exactly round-to-nearest


def test_a_weight_used_twice_on_one_input_counts_its_rows_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x) + self.fc(x).relu()
    calib = [torch.randn(64, 32) for _ in range(4)]
    gm = _compile(Twice().eval(), (calib[0],), "int4-weight", calibration=calib, group_size=32)
    assert _record(gm).info["gptq"]["rows"] == 4 * 64


def test_non_finite_activations_inside_the_model_fall_back_to_mse():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(x * 1e38)  # inf inside when |x| > 3.4
    calib = [torch.randn(64, 32) * 10 for _ in range(4)]  # finite data that overflows inside
    gm = fxopt.compile(Overflow().eval(), (torch.rand(64, 32),), recipe="canonicalize,insert-qdq(weight=int4/group32/asym/"
                       "gptq,activation=none)", calibration=calib, progress=False)
    assert "non-finite calibration inputs (mse)" in _record(gm).info["gptq"]["fallback_mse"]


def test_per_channel_gptq_needs_output_channel_scales():
    w, h = torch.randn(8, 16), torch.eye(16, dtype=torch.float64)
    with pytest.raises(CalibrationError, match="output channel"):
        gptq_quantize(w, h, QSpec.parse("int8/channel/axis1/gptq"))
    with pytest.raises(CalibrationError, match="do not match"):
        gptq_quantize(w, torch.eye(8, dtype=torch.float64), QSpec.parse("int8/channel/gptq"))


def test_int4_weight_with_calibration_uses_gptq_and_lowers_exactly():
    torch.manual_seed(0)
    model = MLP(128, 256, 32).eval()
    before = state_hash(model)
    x = _correlated(64, 128, seed=0)
    calib = [_correlated(64, 128, seed=s) for s in range(1, 17)]
    gm = _compile(model, (x,), "int4-weight", calibration=calib, group_size=32)
    info = _record(gm).info
    assert info["gptq"]["layers"] == 2 and info["gptq"]["rows"] == 16 * 64
    assert info["gptq_weights"] == 2 and "gptq_declined" not in info
    assert _record(gm, "lower-quant").changed  # the int4 kernels took the GPTQ codes; lower-quant checked them
    assert state_hash(model) == before
    rtn = _compile(model, (x,), "int4-weight", group_size=32)  # no calibration: round to nearest
    held = _correlated(256, 128, seed=50)
    with torch.no_grad():
        ref = model(held)
        e_gptq, e_rtn = (gm(held) - ref).pow(2).mean(), (rtn(held) - ref).pow(2).mean()
    assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


def test_too_little_data_falls_back_to_mse_and_says_so():
    torch.manual_seed(0)
    model = MLP(128, 256, 32).eval()
    x = torch.randn(8, 128)  # 8 rows < 4 per input feature
    gm = _compile(model, (x,), "int4-weight", group_size=32)
    g = _record(gm).info["gptq"]
    assert g["layers"] == 0
    (why, layers), = g["fallback_mse"].items()
    assert f"fewer than {MIN_ROWS_PER_INPUT}" in why and "calibration=" in why and len(layers) == 2
    mse = _compile(model, (x,), "canonicalize,fold-bn,insert-qdq(weight=int4/group32/asym/mse,activation=none),"
                   "lower-quant,cleanup")
    assert _same_state(gm, mse)  # exactly the mse codes


def test_convs_fall_back_to_mse_and_the_record_names_them():
    torch.manual_seed(0)
    model = ResCNN().eval()
    x = torch.randn(4, 3, 16, 16)
    gm = _compile(model, (x,), "int4-weight", calibration=[torch.randn(4, 3, 16, 16) for _ in range(4)])
    fallback = _record(gm).info["gptq"]["fallback_mse"]
    assert any("convs have no input Hessian" in k for k in fallback)


def test_calibration_batches_of_other_lengths_feed_the_hessian():
    torch.manual_seed(0)
    model = MLP(64, 128, 16).eval()
    x = torch.randn(4, 10, 64)
    calib = [torch.randn(4, n, 64) for n in (7, 12, 30, 9, 40, 33)]
    gm = _compile(model, (x,), "int4-weight", calibration=calib, group_size=32, dynamic=True)
    assert _record(gm).info["gptq"]["rows"] == 4 * sum((7, 12, 30, 9, 40, 33))


def test_gptq_is_a_weight_observer_only():
    with pytest.raises((PipelineError, RecipeError), match="gptq rounds weights"):
        fxopt.compile(MLP(), (torch.randn(2, 16),), recipe="insert-qdq(activation=uint8/tensor/gptq)",
                      calibration=[torch.randn(2, 16)], progress=False)


def test_nan_calibration_data_is_a_clear_error():
    model = MLP(128, 64, 8).eval()
    bad = torch.randn(64, 128)
    bad[3, 7] = float("nan")
    with pytest.raises(fxopt.errors.CalibrationError, match="NaN"):
        fxopt.compile(model, (torch.randn(4, 128),), recipe="int4-weight", calibration=[bad],
                      group_size=32, progress=False)

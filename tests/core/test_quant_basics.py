"""QSpec text and arithmetic, observers, and calibration (fxopt/quant/qspec.py, observers.py, calibrate.py)."""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.quant.calibrate import iter_calibration
from fxopt.errors import CalibrationError, PipelineError
from fxopt.quant.observers import make_observer, weight_qparams
from fxopt.quant.qspec import QSpec, dequantize, quantize


@pytest.mark.parametrize("text", ["int8/channel", "uint8/tensor", "int4/group64", "int8/token",
                                  "uint8/tensor/percentile", "int8/channel/mse", "int8/tensor/asym",
                                  "int8/channel/axis1"])
def test_spec_text_round_trips(text):
    assert str(QSpec.parse(text)) == text
    assert QSpec.parse(str(QSpec.parse(text))) == QSpec.parse(text)


def test_spec_ranges_and_errors():
    assert (QSpec.parse("int8").qmin, QSpec.parse("int8").qmax) == (-127, 127)
    assert (QSpec.parse("int8/asym").qmin, QSpec.parse("int8/asym").qmax) == (-128, 127)
    assert (QSpec.parse("int4/group32").qmin, QSpec.parse("int4/group32").qmax) == (-7, 7)
    assert QSpec.parse("int8/token").dynamic
    for bad in ("fp8", "int8/chanel", "int9", "int8/groupx", "int8/token/asym"):
        with pytest.raises(PipelineError):
            QSpec.parse(bad)


def test_quantize_is_round_half_even_and_clamped():
    s, z = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -300.0]), s, z, -127, 127)
    assert q.dtype == torch.int8 and q.tolist() == [0, 2, 2, 0, 127, -127]
    u = quantize(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor(1 / 128), torch.tensor(128, dtype=torch.int32), 0, 255)
    assert u.dtype == torch.uint8 and u.tolist() == [0, 128, 255]
    assert dequantize(u, torch.tensor(2.0), torch.tensor(128)).tolist() == [-256.0, 0.0, 254.0]


def test_group_quantization_uses_one_scale_per_group():
    w = torch.cat([torch.full((2, 4), 0.01), torch.full((2, 4), 10.0)], 1)  # two groups of 4 per row
    spec = QSpec.parse("int4/group4")
    scale, zp = weight_qparams(w, spec)
    assert scale.shape == (2, 2)
    back = dequantize(quantize(w, scale, zp, spec.qmin, spec.qmax, 4), scale, zp, 4)
    assert torch.allclose(back, w, rtol=1e-6)  # per-tensor int4 would flush the 0.01 group to zero


def test_per_channel_weight_scales_follow_each_row():
    w = torch.randn(6, 5) * torch.arange(1, 7).float()[:, None]
    scale, zp = weight_qparams(w, QSpec.parse("int8/channel"))
    assert scale.shape == (6, 1) and (zp == 0).all()
    assert torch.allclose(scale.flatten(), w.abs().amax(1) / 127)
    err = (dequantize(quantize(w, scale, zp, -127, 127), scale, zp) - w).abs()
    assert (err <= scale / 2 + 1e-7).all()


def test_observers():
    data = [torch.randn(1000) for _ in range(3)] + [torch.tensor([50.0])]  # one outlier
    results = {}
    for kind in ("minmax", "moving-average", "percentile", "mse"):
        obs = make_observer(QSpec.parse(f"uint8/tensor/{kind}"), **({"percentile": 99.9} if kind == "percentile" else {}))
        for x in data:
            obs.update(x)
        results[kind] = float(obs.qparams()[0])
    assert results["minmax"] == pytest.approx((50.0 - float(min(x.min() for x in data))) / 255, rel=1e-5)
    assert results["percentile"] < results["minmax"] / 4   # clips the lone 50
    assert results["mse"] <= results["minmax"]  # one far outlier costs more clipped than rounded
    # a Laplace tail at 4 bits: the best clipping range is about half the observed maximum
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    mse, mm = make_observer(QSpec.parse("uint4/tensor/mse")), make_observer(QSpec.parse("uint4/tensor"))
    for o in (mse, mm):
        o.update(heavy)
    assert float(mse.qparams()[0]) < 0.7 * float(mm.qparams()[0])
    assert results["moving-average"] < results["minmax"]   # the outlier batch moves the average 10%
    ch = make_observer(QSpec.parse("int8/channel/axis1"))
    ch.update(torch.tensor([[1.0, -4.0], [2.0, 3.0]]))
    assert ch.qparams()[0].tolist() == pytest.approx([2 / 127, 4 / 127])
    with pytest.raises(CalibrationError, match="NaN"):
        make_observer(QSpec()).update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="no data"):
        make_observer(QSpec()).qparams()


def test_sampling_observers_are_deterministic():
    x = torch.randn(100_000)
    a, b = (make_observer(QSpec.parse("uint8/tensor/percentile")) for _ in range(2))
    a.update(x)
    b.update(x)
    assert torch.equal(a.qparams()[0], b.qparams()[0])


def _gm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return fxopt.trace(model, (torch.randn(3, 4),))


def test_calibrate_records_ranges_and_accepts_loader_pairs():
    gm = _gm()
    ranges = fxopt.calibrate(gm, [torch.randn(5, 4) for _ in range(3)])
    assert len(ranges) == 2 and all(o.batches == 3 for o in ranges.values())
    assert "batches" in ranges.table()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 4), torch.zeros(20)),
                                         batch_size=8)
    ranges = fxopt.calibrate(gm, loader, inputs=0)
    assert all(o.batches == 3 for o in ranges.values())
    before = [n.name for n in gm.graph.nodes]
    fxopt.calibrate(gm, [torch.randn(2, 4)])
    assert [n.name for n in gm.graph.nodes] == before  # taps are removed


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    ([torch.full((2, 4), float("nan"))], "NaN"),
    ([torch.randn(2, 5)], "does not match"),
    ([torch.randn(2, 4, 1)], "rank and dtype"),
    ([torch.randint(0, 3, (2, 4))], "rank and dtype"),
    ([(torch.randn(2, 4), torch.zeros(2))], "positional"),
    (torch.randn(2, 4), "wrap a single batch"),
    ([object()], "tensor, a tuple"),
])
def test_bad_calibration_data_gets_a_typed_error(data, match):
    with pytest.raises(CalibrationError, match=match):
        fxopt.calibrate(_gm(), data)


def test_calibration_nan_activation_names_the_node():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.log(x))  # log of a negative number is NaN

    gm = fxopt.trace(Bad(), (torch.rand(2, 4) + 0.1,))
    with pytest.raises(CalibrationError, match="NaN or Inf.*at node"):
        fxopt.calibrate(gm, [-torch.rand(2, 4)])


def test_iter_calibration_caps_batches():
    seen = [i for i, _, _ in iter_calibration([torch.randn(1)] * 10, max_batches=3)]
    assert seen == [0, 1, 2]

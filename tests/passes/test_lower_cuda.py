"""Lowering for CUDA: the QDQ and sparsity graphs become the Triton ops, agree with their simulation,
keep a kernel only where it is timed faster, and save and load.

Without a GPU, ``target=cuda`` lowers CPU tensors for a GPU and the kernels run under Triton's
interpreter (tests/conftest.py); on a GPU the same tests run on the device.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.passes.lower import rules_cuda

pytest.importorskip("triton")
from fxopt.kernels.triton_common import runs_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not runs_triton(torch.empty(0, device=DEV)),
                                reason="Triton kernels neither compiled (no GPU) nor interpreted here")
fxq = torch.ops.fxopt
LQ = "lower-quant(target=cuda,decline=never)"


class MLP(nn.Module):
    def __init__(self, act=nn.GELU):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(40, 32), act(), nn.Linear(32, 12)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DEV)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


PIPES = {
    "int8-dynamic": ("canonicalize,insert-qdq(activation=int8/token)", fxq.linear_int8_dynamic_gpu.default),
    "int8": ("canonicalize,insert-qdq", fxq.linear_int8_gpu.default),
    "int8-weight": ("canonicalize,insert-qdq(activation=none)", fxq.linear_wq_gpu.default),
    "int4-weight": ("canonicalize,insert-qdq(weight=int4/group8/asym,activation=none)", fxq.linear_wq_gpu.default),
}


@pytest.mark.parametrize("name", list(PIPES))
@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_quant_graphs_lower_to_the_gpu_ops_and_equal_their_simulation(name, act):
    model = MLP(act).eval().to(DEV)
    x = _x(3, 5, 40)
    head, op = PIPES[name]
    calib = [(_x(3, 5, 40),)]
    sim = fxopt.compile(model, (x,), recipe=head, calibration=calib)
    low = fxopt.compile(model, (x,), recipe=f"{head},{LQ},cleanup", calibration=calib)
    targets = _targets(low)
    assert targets.count(op) == 2 and fxq.dequantize.default not in targets, targets
    rec = next(r for r in low.fxopt_history.records if r.name == "lower-quant")
    assert rec.info["device"] == "cuda" and rec.info["kept"] == []
    if op is not fxq.linear_wq_gpu.default:  # the W8A8 epilogue takes the activation in
        assert all(t not in targets for t in (torch.ops.aten.gelu.default, torch.ops.aten.relu.default))
        assert any(k.endswith(("_gelu", "_relu")) for k in rec.info["lowered"])
    with torch.no_grad():
        want, got = sim(x), low(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5


def test_sparse_graphs_lower_to_the_24_and_block_sparse_ops():
    model = MLP().eval().to(DEV)
    x = _x(4, 40)
    low = fxopt.compile(model, (x,), recipe="canonicalize,sparsify-2:4(keep_output=false),"
                        "lower-sparse(target=cuda,decline=never),cleanup")
    assert _targets(low).count(fxq.linear_24_gpu.default) == 2
    dense = fxopt.compile(model, (x,), recipe="canonicalize,sparsify-2:4(keep_output=false),cleanup")
    torch.testing.assert_close(low(x), dense(x), atol=1e-4, rtol=1e-4)


def test_block_sparse_weights_lower_to_bsr_even_when_they_are_also_2_4():
    """A weight with 3 of its 4 32x32 tiles zero, and under 2 non-zeros in every 4 of the last: BSR
    (which skips whole tiles) takes it, not 2:4; a dense layer stays dense."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        w = torch.zeros(64, 64)
        w[:32, :32] = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
        w[:32, :32][:, 1::2] = 0  # also 2:4
        model[0].weight.copy_(w)
    model = model.to(DEV)
    x = _x(5, 64)
    low = fxopt.compile(model, (x,), recipe="canonicalize,lower-sparse(target=cuda,decline=never,max_density=0.2),"
                        "cleanup")
    rec = next(r for r in low.fxopt_history.records if r.name == "lower-sparse")
    targets = _targets(low)
    assert targets.count(fxq.linear_bsr_gpu.default) == 1 and fxq.linear_24_gpu.default not in targets, rec.info
    assert len(rec.info["dense"]) == 1, rec.info
    torch.testing.assert_close(low(x), model(x), atol=1e-4, rtol=1e-4)


def _fake_clock(monkeypatch, fastest):
    """Timings where ``fastest(rows)`` names the winner of each bucket."""
    monkeypatch.setattr(rules_cuda, "_PLANS", {})
    monkeypatch.setattr(rules_cuda, "_time",
                        lambda name, fn, x: (fn(x), 1.0 if name == fastest(x.shape[0]) else 2.0)[1])


def test_a_layer_whose_float_form_is_faster_everywhere_is_declined(monkeypatch):
    _fake_clock(monkeypatch, lambda rows: "float")
    model = MLP().eval().to(DEV)
    x = _x(2, 40)
    low = fxopt.compile(model, (x,), recipe="canonicalize,insert-qdq(activation=int8/token),"
                        "lower-quant(target=cuda,decline=slower),cleanup")
    rec = next(r for r in low.fxopt_history.records if r.name == "lower-quant")
    assert set(rec.info["declined"]) == {"a_linear", "b_linear"}, rec.info
    assert "float form was timed fastest" in rec.info["declined"]["a_linear"]
    assert rec.info["gpu_plans"]["a_linear"]["plan"] == "float,float,float,float"
    assert rec.info["gpu_plans"]["a_linear"]["ms"]["M<=1"] == {"triton": 2.0, "float": 1.0}
    assert fxq.linear_int8_dynamic_gpu.default not in _targets(low)
    torch.testing.assert_close(low(x), model(x), atol=0.05, rtol=0.05)  # int8 weights, float activations


def test_each_row_bucket_keeps_what_was_faster(monkeypatch):
    _fake_clock(monkeypatch, lambda rows: "triton" if rows <= 16 else "float")
    model = MLP().eval().to(DEV)
    x = _x(2, 40)
    low = fxopt.compile(model, (x,), recipe="canonicalize,insert-qdq(activation=none),"
                        "lower-quant(target=cuda,decline=slower),cleanup")
    nodes = [n for n in low.graph.nodes if n.target is fxq.linear_wq_gpu.default]
    assert len(nodes) == 2 and all(n.args[-1] == "triton,triton,float,float" for n in nodes)
    for rows in (1, 300):  # each bucket runs its choice and both compute the layer
        xb = _x(rows, 40)
        torch.testing.assert_close(low(xb), model(xb), atol=0.05, rtol=0.05)


def test_a_wrong_gpu_kernel_is_caught_and_rolled_back(monkeypatch):
    import fxopt.passes.lower.lower_quant as lq
    from fxopt.kernels.triton_int8 import linear_int8_dynamic_gpu_reference as ref
    monkeypatch.setitem(lq._SIM, fxq.linear_int8_dynamic_gpu.default, lambda *a: ref(*a) + 1)
    with pytest.warns(UserWarning, match="lower-quant"):
        low = fxopt.compile(MLP().eval().to(DEV), (_x(2, 40),),
                            recipe=f"canonicalize,insert-qdq(activation=int8/token),{LQ},cleanup")
    fail = low.fxopt_history.failures[0]
    assert fail.name == "lower-quant" and "differs from its simulated QDQ form" in fail.error
    assert fxq.dequantize.default in _targets(low)  # the simulated graph stands


@pytest.mark.parametrize("name", ["int8-dynamic", "int4-weight"])
def test_lowered_gpu_graphs_save_and_load(tmp_path, name):
    model = MLP().eval().to(DEV)
    x = _x(3, 40)
    low = fxopt.compile(model, (x,), recipe=f"{PIPES[name][0]},{LQ},cleanup")
    fxopt.save(low, tmp_path / "m.fxopt")
    back = fxopt.load(tmp_path / "m.fxopt")
    assert PIPES[name][1] in _targets(back)
    torch.testing.assert_close(back(x.cpu()).to(DEV) if DEV != "cpu" else back(x), low(x))


def test_bad_targets_are_refused():
    with pytest.raises(Exception, match=r"target=.*auto \(the graph's device\), cpu or cuda"):
        fxopt.compile(MLP(), (torch.randn(2, 40),), recipe="canonicalize,insert-qdq,lower-quant(target=tpu)")
    with pytest.raises(Exception, match=r"target=.*auto \(the graph's device\), cpu or cuda"):
        fxopt.compile(MLP(), (torch.randn(2, 40),), recipe="lower-sparse(target=gpu)")


def test_cpu_graphs_keep_the_cpu_kernels():
    low = fxopt.compile(MLP().eval(), (torch.randn(2, 40),), recipe="int8-dynamic")
    targets = _targets(low)
    assert fxq.linear_int8_dynamic.default in targets and fxq.linear_int8_dynamic_gpu.default not in targets

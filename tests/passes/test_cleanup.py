"""Contract tests for the cleanup passes: structure, numerics against eager, idempotence,
and the analyses each pass claims to preserve (recomputed by the manager's check)."""
import pytest
import torch

import fxopt
from fxopt.ir.dialect import aten
from models import MLP, DictOut, Redundant, ResCNN

CLEANUP = ["remove-noops", "fold-constants", "cse", "dce"]


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def run_pass(name, model, args, kwargs=None, **manager_kw):
    gm = fxopt.trace(model, args, kwargs)
    res = fxopt.PassManager(name, strict=True, check_preserved=True, **manager_kw).run(gm, args, kwargs)
    return gm, res


def prime_analyses():
    """An instrument that computes every analysis before each pass, so check_preserved has work."""
    class Prime(fxopt.Instrument):
        def before_pass(self, p, gm, ctx):
            for name in fxopt.list_analyses():
                ctx.analysis(name, gm)
    return Prime()


SMALL = [
    ("mlp", MLP, (torch.randn(3, 16),), None),
    ("rescnn", ResCNN, (torch.randn(2, 3, 8, 8),), None),
    ("redundant", Redundant, (torch.randn(8, 8),), None),
    ("dictout", DictOut, (), {"input_ids": torch.randint(0, 50, (2, 5)),
                              "attention_mask": torch.ones(2, 5, dtype=torch.long)}),
]


@pytest.mark.parametrize("name", CLEANUP + ["cleanup"])
@pytest.mark.parametrize("label,make,args,kwargs", SMALL, ids=[s[0] for s in SMALL])
def test_contract_on_small_models(name, label, make, args, kwargs):
    model = make().eval()
    gm, res = run_pass(name, model, args, kwargs, instruments=[prime_analyses()])
    kwargs = kwargs or {}
    # numerics against eager, at the example batch and another one
    ref, out = model(*args, **kwargs), gm(*args, **kwargs)
    assert fxopt.ir.graph_utils.max_abs_error(out, ref) <= 1e-6
    # idempotence: a second run reports no change
    again = fxopt.PassManager(name, strict=True).run(gm, args, kwargs)
    assert not again.changed, again.history.table()
    assert not res.history.failures


def test_remove_noops_structure():
    model = Redundant().eval()
    gm, res = run_pass("remove-noops,dce", model, (torch.randn(8, 8),))  # dce drops the orphaned inner t()
    for t in (aten.t.default, aten.transpose.int, aten.view.default, aten.clone.default, aten.div.Tensor):
        assert count(gm, t) == 0, t
    assert count(gm, aten.relu.default) == 1
    assert count(gm, aten.mul.Tensor) == 1  # b * scale stays; `* 1` went
    assert count(gm, aten.add.Tensor) == 1  # a + b stays; `+ 0` went


def test_remove_noops_keeps_what_is_not_a_noop():
    class M(torch.nn.Module):
        def forward(self, x, n):
            a = x * 1.0                 # int * float changes dtype: not a no-op
            b = x.view(-1)              # different shape
            c = n.clone()               # a copy of an input: kept so outputs never alias inputs
            d = n.transpose(0, 1)
            return a, b, c, d
    x, n = torch.arange(6).reshape(2, 3), torch.randn(2, 3)
    gm, _ = run_pass("remove-noops", M(), (x, n))
    assert count(gm, aten.mul.Tensor) == 1 and count(gm, aten.view.default) == 1
    assert count(gm, aten.clone.default) == 1 and count(gm, aten.transpose.int) == 1


def test_cse_merges_duplicates_but_not_random_ops():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) + torch.sigmoid(x) + torch.rand_like(x) * 0 + torch.rand_like(x) * 0
    gm, res = run_pass("cse", M(), (torch.randn(4),))
    assert count(gm, aten.sigmoid.default) == 1
    assert count(gm, aten.rand_like.default) == 2
    assert res.history.records[0].info["merged"] >= 1


def test_cse_distinguishes_constants():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.add(0.0) * x.add(-0.0) + x.pow(2) + x.pow(3)
    gm, _ = run_pass("cse", M(), (torch.randn(4),))
    assert count(gm, aten.pow.Tensor_Scalar) == 2 and count(gm, aten.add.Tensor) == 4  # 0.0 vs -0.0 kept apart


def test_dce_removes_dead_nodes_and_their_parameters():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            _ = self.unused(x)
            return self.used(x)
    gm, res = run_pass("dce", M(), (torch.randn(2, 4),))
    assert not hasattr(gm, "unused") or not list(gm.unused.parameters())
    rec = res.history.records[0]
    assert rec.params == 20 and rec.removed >= 2  # export drops the call; dce drops the weight reads


def test_dce_keeps_asserts_and_the_shape_guard():
    gm, _ = run_pass("dce", DictOut().eval(), (), {"input_ids": torch.randint(0, 50, (2, 5)),
                                                   "attention_mask": torch.ones(2, 5, dtype=torch.long)})
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    assert count(gm, aten._assert_tensor_metadata.default) >= 1


def test_fold_constants_computes_parameter_only_subgraphs_once():
    model = Redundant().eval()
    gm, res = run_pass("fold-constants,dce", model, (torch.randn(8, 8),))
    assert count(gm, aten.exp.default) == 0 and count(gm, aten.sum.default) == 0
    folded = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded_")]
    assert len(folded) == 1
    assert torch.allclose(getattr(gm, folded[0].target), model.scale.exp().sum())
    assert "scale" not in dict(gm.named_parameters())  # nothing reads it any more


def test_fold_constants_never_grows_the_model():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            big = self.w.repeat(8, 8)            # 64x larger than its input: left alone
            shared = self.w.t() * 2              # w is still needed below: folding would duplicate it
            return x @ self.w + (x @ shared), big * x.sum()
    gm, res = run_pass("fold-constants", M(), (torch.randn(2, 64),))
    assert not res.changed
    assert count(gm, aten.repeat.default) == 1 and count(gm, aten.mul.Tensor) == 2  # t(w)*2 and big*sum


def test_fold_constants_keeps_the_quantized_weights_quantized():
    """A weight's dequantize is constant, and small enough to fold; it stays: it is the quantized form
    lowering and ONNX export match (folded, ONNX Runtime re-quantized the float weight on its own)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    calib = [torch.rand(2, 1, 6, 6) for _ in range(2)]
    gm = fxopt.compile(model, (calib[0],), recipe="canonicalize,insert-qdq,cleanup", calibration=calib)
    weights = [n for n in gm.graph.nodes if n.target is torch.ops.fxopt.dequantize.default
               and n.args[0].op == "get_attr"]
    assert weights and not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded_")]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_cleanup_contract_on_torchvision(torchvision_models, name):
    model = getattr(torchvision_models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm, res = run_pass("cleanup", model, (x,), instruments=[prime_analyses()])
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert not fxopt.PassManager("cleanup").run(gm, (x,)).changed
    assert res.history.final_stats["params"] <= res.history.initial_stats["params"]


def test_cleanup_contract_on_minilm(minilm):
    model, kw = minilm
    gm, res = run_pass("cleanup", model, (), kw, instruments=[prime_analyses()])
    out, ref = gm(**kw), model(**kw)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    h = res.history
    assert h.final_stats["nodes"] < h.initial_stats["nodes"]
    assert not fxopt.PassManager("cleanup").run(gm, (), kw).changed

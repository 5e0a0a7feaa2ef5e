import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import DemoNet
from fxopt.train.training import _evaluate
from fxopt.ir.dialect import get_attr_tensor, is_conv, is_linear
from fxopt.ir.masks import reapply_masks, sparsity_report
from fxopt.passes.compress.sparsity import mask_24


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def weights_of(gm):
    return {n.name: (n, get_attr_tensor(gm, n.args[1])) for n in gm.graph.nodes if is_conv(n) or is_linear(n)}


def test_mask_24_keeps_two_of_every_four():
    w = torch.randn(6, 12)
    m = mask_24(w)
    assert m.reshape(6, 3, 4).sum(-1).eq(2).all()
    kept = torch.where(m, w.abs(), torch.inf).reshape(6, 3, 4).amin(-1)
    dropped = torch.where(~m, w.abs(), -torch.inf).reshape(6, 3, 4).amax(-1)
    assert (kept >= dropped).all()


def test_sparsify_24_structure_metadata_and_output_layer():
    x = torch.randn(2, 4, 6, 6)
    out = fxopt.compile(Net().eval(), (x,), recipe="sparsify-2:4", strict=True)
    rec = out.fxopt_history.records[0]
    assert rec.status == "changed" and rec.info["layers"] == 2 and rec.error_vs_original > 0
    ws = weights_of(out)
    for name, (node, w) in ws.items():
        if name.startswith("fc2"):
            assert "fxopt_sparsity" not in node.meta and (w != 0).all()  # output layer kept dense
        else:
            assert node.meta["fxopt_sparsity"] == {"pattern": "2:4", "density": 0.5}
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).eq(2).all()
    assert out(torch.randn(5, 4, 6, 6)).shape == (5, 10)


def test_magnitude_prune_layer_and_global():
    x = torch.randn(2, 4, 6, 6)
    out = fxopt.compile(Net().eval(), (x,), recipe="magnitude-prune(ratio=0.75)", strict=True)
    dens = out.fxopt_history.records[0].info["density"]
    assert set(dens) == {"conv", "fc1"} and all(abs(d - 0.25) < 0.01 for d in dens.values())
    out = fxopt.compile(Net().eval(), (x,), recipe="magnitude-prune(ratio=0.5,scope=global,keep_output=false)")
    dens = out.fxopt_history.records[0].info["density"]
    assert set(dens) == {"conv", "fc1", "fc2"} and not all(abs(d - 0.5) < 0.01 for d in dens.values())
    total = sum(w.numel() for _, w in weights_of(out).values())
    zeros = sum(int((w == 0).sum()) for _, w in weights_of(out).values())
    assert abs(zeros / total - 0.5) < 0.01
    with pytest.raises(fxopt.PipelineError, match="ratio"):
        fxopt.parse_pipeline("magnitude-prune(ratio=1.5)")


def test_finetune_keeps_the_zeros():
    x = torch.randn(32, 4, 6, 6)
    y = torch.randint(0, 10, (32,))
    sparse = fxopt.compile(Net().eval(), (x[:2],), recipe="sparse-2:4")
    tuned, _ = fxopt.finetune(sparse, [(x, y)] * 3, epochs=2, lr=0.1, progress=False)
    report = sparsity_report(tuned)
    assert len(report) == 2 and all(abs(v - 0.5) < 1e-6 for v in report.values())
    free, _ = fxopt.finetune(sparse, [(x, y)] * 3, epochs=1, lr=0.1, keep_sparsity=False, progress=False)
    assert all(v < 0.5 for v in sparsity_report(free).values())
    assert reapply_masks(free) == 2 and all(abs(v - 0.5) < 1e-6 for v in sparsity_report(free).values())


def test_sparse_24_on_digits_recovers_with_finetuning(digits):
    train, test = digits
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=6, lr=0.05, progress=False)
    from fxopt.train.training import _evaluate
    acc_dense = _evaluate(dense, test, nn.functional.cross_entropy)[1]
    sparse = fxopt.compile(dense, (train[0][0],), recipe="sparse-2:4")
    tuned, hist = fxopt.finetune(sparse, train, epochs=3, lr=0.01, eval_data=test, progress=False)
    assert hist.epochs[-1]["eval_accuracy"] >= acc_dense - 2.0
    assert all(abs(v - 0.5) < 1e-6 for v in sparsity_report(tuned).values())


def test_gradual_pruning_follows_the_cubic_schedule(digits):
    train, test = digits
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=4, lr=0.05, progress=False)
    seen = []

    def watch(step, m):
        if step % 22 == 0:
            seen.append(sum(sparsity_report(m).values()) / len(sparsity_report(m)))
    pruned, hist = fxopt.gradual_prune(dense, train, final_sparsity=0.8, epochs=4, lr=0.01, on_step=watch,
                                       progress=False)
    report = sparsity_report(pruned)
    assert report and all(abs(v - 0.8) < 0.01 for v in report.values())
    assert seen == sorted(seen) and seen[0] < 0.8
    assert _evaluate(pruned, test, nn.functional.cross_entropy)[1] > 85


def test_lower_sparse_runs_very_sparse_linears_as_csr(tmp_path):
    import warnings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.95] = 0     # 5% dense: lowered
        model[2].weight[torch.rand_like(model[2].weight) < 0.5] = 0      # 50% dense: stays dense
    x = torch.randn(8, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = fxopt.compile(model, (x,), recipe="lower-sparse")
    rec = q.fxopt_history.records[0]
    assert list(rec.info["lowered"]) == ["0"] and rec.info["dense"] == ["2", "4"]
    assert sum(n.target is torch.ops.fxopt.linear_csr.default for n in q.graph.nodes) == 1
    torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-4)
    assert q(torch.randn(3, 256)).shape == (3, 10)
    before = fxopt.ir.graph_utils.param_stats(model)[1]
    assert fxopt.ir.graph_utils.param_stats(q)[1] < before - 0.8 * 256 * 512 * 4   # the dense weight is gone
    fxopt.save(q, tmp_path / "s.fxopt")
    torch.testing.assert_close(fxopt.load(tmp_path / "s.fxopt")(x), q(x))
    cost = q.fxopt_history.final_stats["flops"]
    assert cost != q.fxopt_history.initial_stats["flops"]

"""Structured pruning: each coupling kind on a model built for it, plus real architectures
(attention heads: test_prune_attention.py)."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import DemoNet
from fxopt.train.training import _evaluate
from fxopt.passes.analysis.dependency import channel_groups
from models import ResCNN, prune, state_hash, widths


def test_residual_add_couples_producers():
    model = ResCNN(c=8).eval()
    before = state_hash(model)
    out, rec = prune(model, torch.randn(2, 3, 8, 8))
    w = widths(out)
    assert w["conv1_conv2d"][0] == w["conv2_conv2d"][0] == 4   # both sides of the add keep the same 4
    assert w["conv2_conv2d"][1] == 4 and w["head_linear"] == (10, 4)
    assert rec.info["channels"] == {"conv1+conv2": "8->4"}
    assert state_hash(model) == before


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_flatten_into_linear_keeps_spatial_blocks():
    model = FlattenNet().eval()
    x = torch.randn(2, 3, 4, 4)
    out, _ = prune(model, x)
    w = widths(out)
    assert w["conv_conv2d"][0] == 4 and w["fc_linear"] == (5, 4 * 16)
    # the kept channels' 16-feature blocks are exactly the original columns
    from fxopt.passes.compress.prune import group_importance
    gm = fxopt.trace(model, (x,))
    (g,) = [g for g in channel_groups(gm) if g.prunable]
    keep = torch.sort(torch.topk(group_importance(gm, g, "l1"), 4).indices).values
    cols = (keep[:, None] * 16 + torch.arange(16)).reshape(-1)
    fc_w = [t for n, t in out.named_parameters() if t.shape == (5, 64)][0]
    assert torch.equal(fc_w, model.fc.weight[:, cols])


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw2 = nn.Conv2d(16, 8, 1)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.pw2(torch.relu(self.dw(torch.relu(self.pw1(x)))))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3), keepdim=True)))))
        return self.head((h * s).mean((2, 3)))


def test_depthwise_and_squeeze_excitation():
    model = Depthwise().eval()
    out, rec = prune(model, torch.randn(2, 3, 8, 8))
    w = widths(out)
    assert w["pw1_conv2d"][0] == 8 and w["dw_conv2d"] == (8, 1, 3, 3)     # depthwise follows pw1
    assert w["pw2_conv2d"] == (4, 8, 1, 1) and w["se2_conv2d"][0] == 4    # SE gate couples se2 with pw2
    assert w["se1_conv2d"] == (2, 4, 1, 1)
    dw = next(n for n in out.graph.nodes if n.name == "dw_conv2d")
    assert dw.args[6] == 8


class NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def test_linear_and_layer_norm():
    out, _ = prune(NormMLP().eval(), torch.randn(4, 6))
    assert widths(out)["fc1_linear"] == (8, 6) and widths(out)["fc2_linear"] == (2, 8)


class DenseCat(nn.Module):
    """DenseNet-style: two branches and the input itself concatenated, a batch norm over the concat,
    then a conv reading it and a second concat of the concat with a new branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(19)
        self.c = nn.Conv2d(19, 6, 1)
        self.d = nn.Conv2d(25, 4, 1)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), x, torch.relu(self.b(x))], 1)
        h = torch.relu(self.bn(h))
        h2 = torch.cat([h, torch.relu(self.c(h))], 1)
        return self.d(h2).mean(dim=(2, 3))


def _silence_half(model):
    """Zero half of the rows of a, b and c (lowest L1: the ones prune drops) and make the batch norm map
    their zeros to zero, so removing those channels cannot change the output."""
    with torch.no_grad():
        for conv in (model.a, model.b, model.c):
            conv.weight[::2] = 0
            conv.bias[::2] = 0
        bn = model.bn
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        for lo in (0, 11):  # the a- and b- segments of the concat
            bn.running_mean[lo:lo + 8:2] = 0
            bn.bias[lo:lo + 8:2] = 0


def test_concat_prunes_each_input_and_slices_readers_at_offsets():
    torch.manual_seed(0)
    model = DenseCat().eval()
    _silence_half(model)
    x = torch.randn(2, 3, 6, 6)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["a_conv2d"][0] == 4 and w["b_conv2d"][0] == 4 and w["c_conv2d"] == (3, 11, 1, 1)
    assert w["d_conv2d"] == (4, 14, 1, 1)          # 4 + 3 (input) + 4 + 3
    assert rec.info["groups_pruned"] == 3
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    groups = channel_groups(fxopt.trace(DenseCat().eval(), torch.randn(1, 3, 6, 6)))
    assert sum(g.prunable for g in groups) == 3     # a, b, c; d reaches the output


def test_concat_along_another_dim_is_kept_whole():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 2))
    gm = fxopt.trace(Cat().eval(), torch.randn(1, 3, 4, 4))
    groups = channel_groups(gm)
    assert not any(g.prunable for g in groups if g.size == 4)
    assert any("concatenation" in r for g in groups for r in g.reasons)


def test_options_round_ignore_importance():
    model = ResCNN(c=16).eval()
    x = torch.randn(2, 3, 8, 8)
    out, _ = prune(model, x, "prune(ratio=0.7,round_to=8)")
    assert widths(out)["conv1_conv2d"][0] == 8       # 16 - 11 = 5, rounded up to 8
    out = fxopt.compile(model, (x,), recipe="prune(ratio=0.5,ignore=[conv1])")
    assert out.fxopt_history.records[0].status == "unchanged"
    out, _ = prune(model, x, "prune(ratio=0.5,importance=bn)")
    assert widths(out)["conv1_conv2d"][0] == 8
    with pytest.raises(fxopt.PipelineError):
        fxopt.parse_pipeline("prune(importance=random)")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121", "regnet_y_400mf"])
def test_prune_50_on_torchvision(torchvision_models, name):
    model = getattr(torchvision_models, name)().eval()
    before = state_hash(model)
    x = torch.randn(1, 3, 64, 64)
    out = fxopt.compile(model, (x,), recipe="prune-50", strict=True)
    for b in (1, 7):
        assert out(torch.randn(b, 3, 64, 64)).shape == (b, 1000)
    p0, p1 = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in out.parameters())
    assert p1 <= 0.7 * p0
    h = out.fxopt_history
    assert h.final_stats["flops"] != h.initial_stats["flops"]
    # shapes recomputed after pruning keep the batch symbolic (no size-1 specialization)
    flops = h.final_stats["flops"]
    assert not isinstance(flops, int) and flops.subs({s: 0 for s in flops.free_symbols}) == 0
    assert state_hash(model) == before


def test_prune_50_then_finetune_on_digits(digits):
    train, test = digits
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=6, lr=0.05, progress=False)
    acc = _evaluate(dense, test, nn.functional.cross_entropy)[1]
    small = fxopt.compile(dense, (train[0][0],), recipe="prune-50")
    assert sum(p.numel() for p in small.parameters()) < 0.4 * sum(p.numel() for p in dense.parameters())
    acc0 = _evaluate(small, test, nn.functional.cross_entropy)[1]
    tuned, hist = fxopt.finetune(small, train, epochs=5, optimizer="adam", lr=3e-3, eval_data=test,
                                 progress=False)
    # measured: 98.5% dense, ~10% right after pruning this small net, ~98% after 5 epochs
    # (batch norms re-estimate their statistics while fine-tuning)
    assert acc > 95 and acc0 < 50 and hist.epochs[-1]["eval_accuracy"] >= acc - 1.5


def test_taylor_importance_drops_channels_nobody_uses():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Net().eval()
    with torch.no_grad():
        model.a.weight[:8] *= 10      # the first 8 channels have the largest weights (L1 keeps them) ...
        model.b.weight[:, :8] = 0     # ... but nothing reads them: their gradient, and Taylor score, is 0
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    by_l1 = fxopt.compile(model, (x,), recipe="prune(ratio=0.5)", strict=True)
    by_taylor = fxopt.compile(model, (x,), recipe="prune(ratio=0.5,importance=taylor)", strict=True,
                              calibration=[(x, y)], calibration_inputs=0)
    torch.testing.assert_close(by_taylor(x), model(x), atol=1e-5, rtol=1e-5)   # only dead channels went
    assert not torch.allclose(by_l1(x), model(x), atol=1e-3)
    # without calibration data the example inputs drive the gradients
    assert fxopt.compile(model, (x,), recipe="prune(ratio=0.5,importance=taylor)", strict=True)(x).shape == (32, 4)


@torch.library.custom_op("fxopt_test::soft_clip", mutates_args=())
def _soft_clip(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 2


@_soft_clip.register_fake
def _(x):
    return torch.empty_like(x)


def test_custom_op_channel_rule():
    from fxopt.passes.analysis.dependency import CHANNEL_RULES, register_channel_rule

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.ops.fxopt_test.soft_clip(self.a(x))).mean(dim=(2, 3))

    x = torch.randn(2, 3, 6, 6)
    gm = fxopt.trace(Net().eval(), (x,))
    a_group = next(g for g in channel_groups(gm) if g.size == 8)
    assert not a_group.prunable and any("soft_clip" in r for r in a_group.reasons)
    register_channel_rule(torch.ops.fxopt_test.soft_clip, "elementwise")
    try:
        assert next(g for g in channel_groups(gm) if g.size == 8).prunable
        out, _ = prune(Net().eval(), x)
        assert widths(out)["a_conv2d"][0] == 4 and widths(out)["b_conv2d"][1] == 4
    finally:
        CHANNEL_RULES.pop(torch.ops.fxopt_test.soft_clip.default, None)
    with pytest.raises(fxopt.PipelineError):
        register_channel_rule(torch.ops.fxopt_test.soft_clip, "magic")


def test_grouped_conv_prunes_equally_per_group():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
            self.g, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
            self.c = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            h = torch.relu(self.bn1(self.a(x)))
            h = torch.relu(self.bn2(self.g(h)))
            return self.c(h).mean(dim=(2, 3))

    model = Block().eval()
    with torch.no_grad():  # silence channels 1 and 3 of every group (lowest L1): pruning them is exact
        for conv in (model.a, model.g):
            dead = torch.tensor([i for i in range(16) if i % 4 in (1, 3)])
            conv.weight[dead] = 0
            conv.bias[dead] = 0
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(-1, 1)
            bn.running_mean[dead] = 0
            bn.bias[dead] = 0
    x = torch.randn(2, 3, 6, 6)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["a_conv2d"][0] == 8 and w["g_conv2d"] == (8, 2, 3, 3) and w["c_conv2d"][1] == 8
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def channel_shuffle(x, g=2):
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleNetLike(nn.Module):
    """ShuffleNetV2's two block kinds: two branches concatenated then shuffled, and chunk -> one
    half passes through, the other through a depthwise branch -> concatenated -> shuffled."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 1 if groups == 1 else 3, padding=0 if groups == 1 else 1,
                                           groups=groups), nn.BatchNorm2d(cout), nn.ReLU())
        self.stem = cbr(3, 8)
        self.b1, self.b2 = cbr(8, 4), cbr(8, 4)
        self.dw = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
        self.pw = cbr(4, 4)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        x = channel_shuffle(torch.cat([self.b1(x), self.b2(x)], 1))
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([x1, self.pw(self.dw(x2))], 1))
        return self.head(x).mean(dim=(2, 3))


def test_channel_shuffle_and_chunk_prune_exactly():
    """Even channels of every producer carry nothing (zero rows, batch norms map 0 to 0): pruning
    must drop exactly those, route the kept ones as before and match the original output."""
    torch.manual_seed(0)
    model = ShuffleNetLike().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m is not model.head:
                m.weight[::2] = 0
                m.bias[::2] = 0
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["stem_0_conv2d"][0] == 4 and w["b1_0_conv2d"] == (2, 4, 1, 1) and w["b2_0_conv2d"][0] == 2
    assert w["dw_0_conv2d"] == (2, 1, 3, 3) and w["pw_0_conv2d"] == (2, 2, 1, 1) and w["head_conv2d"] == (6, 4, 1, 1)
    assert rec.info["groups_pruned"] == 4
    targets = {n.target for n in out.graph.nodes}
    assert torch.ops.aten.split_with_sizes.default in targets and torch.ops.aten.index_select.default in targets
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def test_split_parts_read_elementwise_together_are_kept_whole():
    class Glu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, dim=1)
            return self.b(p * torch.sigmoid(q)).mean(dim=(2, 3))
    groups = channel_groups(fxopt.trace(Glu().eval(), torch.randn(1, 3, 4, 4)))
    (g,) = [g for g in groups if g.size == 8]
    assert not g.prunable and any("split" in r for r in g.reasons)


def test_uneven_split_keeps_every_part_non_empty():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            p, q = torch.split(self.a(x), [2, 6], dim=1)
            return (self.b(p) + self.c(q)).mean(dim=(2, 3))
    model = Split().eval()
    with torch.no_grad():
        model.a.weight[:2] *= 1e-3    # the 2-channel part is least important: it still keeps one
    out, _ = prune(model, torch.randn(2, 3, 4, 4))
    w = widths(out)
    assert w["a_conv2d"][0] == 4 and w["b_conv2d"][1] == 1 and w["c_conv2d"][1] == 3


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean(dim=(2, 3))


def test_per_layer_ratios_and_global_scope():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    with torch.no_grad():  # a: 12 tiny rows; b: all rows alike
        model.a.weight[4:] *= 1e-3
        model.b.weight.copy_(torch.ones(16, 16, 1, 1) + 0.01 * torch.randn(16, 16, 1, 1))
    x = torch.randn(2, 3, 4, 4)
    out, _ = prune(model, x, "prune(ratio=0.5,ratios=['b=0.25'])")
    w = widths(out)
    assert w["a_conv2d"][0] == 8 and w["b_conv2d"][0] == 12
    out, _ = prune(model, x, "prune(ratio=0.5,scope=global)")
    w = widths(out)
    assert w["a_conv2d"][0] == 4 and w["b_conv2d"][0] == 12   # the 16 channels that go are mostly a's
    out, _ = prune(model, x, "prune(ratio=0.5,scope=global,max_ratio=0.5)")
    assert widths(out)["a_conv2d"][0] == 8                     # capped at half of a
    for bad in ("prune(scope=everywhere)", "prune(ratios=['b'])", "prune(ratios=['b=1.5'])", "prune(max_ratio=1)"):
        with pytest.raises(fxopt.PipelineError):
            fxopt.parse_pipeline(bad)


def test_grouped_conv_changing_channel_count_prunes_both_sides_per_group():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g, self.bn = nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)
            self.c = nn.Conv2d(12, 5, 1)

        def forward(self, x):
            return self.c(torch.relu(self.bn(self.g(torch.relu(self.a(x)))))).mean(dim=(2, 3))

    model = Block().eval()
    with torch.no_grad():  # a's odd channels (one per group of 2) and g's first row of every group of 3 are silent
        model.a.weight[1::2] = 0
        model.a.bias[1::2] = 0
        model.g.weight[0::3] = 0
        model.g.bias[0::3] = 0
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
        model.bn.running_mean[0::3] = 0
        model.bn.bias[0::3] = 0
    x = torch.randn(2, 3, 6, 6)
    out, rec = prune(model, x)
    w = widths(out)
    # g: 12 -> 6 rounded up to 8 (2 of 3 per group); a: 8 -> 4 (1 of 2 per group)
    assert w["a_conv2d"][0] == 4 and w["g_conv2d"] == (8, 1, 3, 3) and w["c_conv2d"][1] == 8
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: the residual stream goes channels-last for a linear, comes back and is scaled
    by a per-channel layer scale before the add."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.pw = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head((x + self.gamma * y).mean(dim=(2, 3)))


def test_permutes_and_layer_scale_prune_exactly():
    torch.manual_seed(0)
    model = ChannelsLastBlock().eval()
    with torch.no_grad():  # even channels of the stream carry nothing
        for m in (model.stem, model.pw):
            m.weight[::2] = 0
            m.bias[::2] = 0
    x = torch.randn(2, 3, 4, 4)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["stem_conv2d"][0] == 4 and w["pw_linear"] == (4, 4) and w["head_linear"] == (3, 4)
    assert sorted(tuple(p.shape) for n, p in out.named_parameters() if "gamma" in n) == [(4, 1, 1)]
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def test_pointwise_ops_carry_a_concatenation_to_its_reader():
    class CatAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(nn.functional.hardswish(torch.cat([self.a(x), self.b(x)], 1))).mean(dim=(2, 3))
    out, rec = prune(CatAct().eval(), torch.randn(2, 3, 4, 4))
    assert rec.info["groups_pruned"] == 2 and widths(out)["c_conv2d"] == (2, 4, 1, 1)


def test_channel_groups_through_the_analysis_manager_match_the_function_and_are_cached():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(1, 3, 8, 8))
    ctx = fxopt.PassContext((torch.randn(1, 3, 8, 8),))
    via_manager = ctx.analysis("channel-groups", gm)
    assert [g.describe() for g in via_manager] == [g.describe() for g in channel_groups(gm)]
    assert ctx.analysis("channel-groups", gm) is via_manager  # cached until a pass invalidates it


def test_taylor_importance_on_a_model_returning_a_dict():
    """Hugging Face encoders return a ModelOutput (a dict): the Taylor loss reads its first float tensor."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = nn.Embedding(50, 8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, input_ids):
            h = self.emb(input_ids)
            return {"last_hidden_state": h + self.b(torch.relu(self.a(h))), "ids": input_ids}

    torch.manual_seed(0)
    kw = {"input_ids": torch.randint(0, 50, (4, 6))}
    p = fxopt.compile(Enc().eval(), kwargs=kw, recipe="prune(ratio=0.5,importance=taylor)", strict=True,
                      calibration=[kw, {"input_ids": torch.randint(0, 50, (4, 6))}])
    rec = next(r for r in p.fxopt_history.records if r.name == "prune")
    assert rec.status == "changed" and rec.info["channels"] == {"a": "16->8"}

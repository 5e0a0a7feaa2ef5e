"""The ``channel-groups`` analysis as data: typed members, one rule per op kind, user rules
(passes/analysis/dependency.py, channel_rules.py, channel_members.py, channel_layouts.py)."""
import dataclasses

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes.analysis import channel_rules
from fxopt.passes.analysis.channel_members import (BatchNorm, FlattenSize, HeadCount, LayoutReads, Member, Produces,
                                                   Reads, Segment, SplitSizes, slice_arg)
from fxopt.passes.analysis.channel_rules import CHANNEL_RULES, ChannelRule, register_channel_rule, rules_for
from fxopt.passes.analysis.dependency import ChannelGroupsAnalysis, ConvLinear, channel_groups
from models import prune, widths


class ConvBnFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.a(x))), 1))


def test_members_are_typed_records_of_where_the_channels_live():
    gm = fxopt.trace(ConvBnFlatten().eval(), torch.randn(2, 3, 4, 4))
    (g,) = [g for g in channel_groups(gm) if g.prunable]
    kinds = [type(m) for m in g.members]
    assert kinds == [Produces, BatchNorm, FlattenSize, Reads]
    assert g.of(FlattenSize)[0].block == 16 and g.of(Reads)[0].block == 16   # H*W features per channel
    assert g.of(Produces)[0].node is g.producers[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.members[0].block = 2


def test_attention_heads_are_head_members_with_row_blocks():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    gm = fxopt.trace(layer, torch.randn(2, 5, 16))
    from fxopt.ir.rewrite_utils import unpack_packed_projections, unpack_split_params
    from fxopt.ir.meta import propagate_meta
    unpack_split_params(gm) + unpack_packed_projections(gm)
    propagate_meta(gm)
    heads = [g for g in channel_groups(gm) if g.heads]
    assert heads and all(g.size == 4 for g in heads)
    assert all(p.block == 4 for g in heads for p in g.of(Produces))   # 4 rows (head_dim) per head
    assert all(h.count == 4 for g in heads for h in g.of(HeadCount))


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        p, q = torch.split(y, [5, 5], 1)
        return self.c(torch.cat([q, p], 1)).mean((2, 3))


def test_layouts_are_segments_resolved_to_groups():
    gm = fxopt.trace(Cat().eval(), torch.randn(1, 3, 4, 4))
    groups = [g for g in channel_groups(gm) if g.prunable]
    assert sorted(g.size for g in groups) == [4, 6]
    readers = {m for g in groups for m in g.members if isinstance(m, (LayoutReads, SplitSizes))}
    for m in readers:
        assert all(isinstance(s, Segment) and (s.group is None or s.group in groups) for s in m.layout)
    # the split divides b's six channels 1 | 5 between its parts: b is cut there
    b = next(g for g in groups if g.size == 6)
    assert 1 in b.cuts


def test_one_rule_object_per_op_kind():
    gm = fxopt.trace(ConvBnFlatten().eval(), torch.randn(2, 3, 4, 4))
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    assert [type(r) for r in rules_for(conv, "producer")] == [ConvLinear]
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert [type(r).__name__ for r in rules_for(relu, "space")] == ["Pointwise"]


def test_a_user_rule_is_asked_before_the_built_in_one():
    gm = fxopt.trace(ConvBnFlatten().eval(), torch.randn(2, 3, 4, 4))
    register_channel_rule(torch.ops.aten.relu.default, "opaque")
    try:
        g = next(g for g in channel_groups(gm) if g.size == 8)
        assert not g.prunable and any("relu" in r for r in g.reasons)
    finally:
        CHANNEL_RULES.pop(torch.ops.aten.relu.default)
    assert next(g for g in channel_groups(gm) if g.size == 8).prunable


@torch.library.custom_op("fxopt_test::channel_scale", mutates_args=())
def _channel_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s[:, None, None]


@_channel_scale.register_fake
def _(x, s):
    return torch.empty_like(x)


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleParam(Member):
    """The per-channel scale of ``channel_scale``: sliced with the channels."""

    def prune(self, gm, group, keep):
        slice_arg(gm, self.node, 1, 0, keep)


class ChannelScaleRule(ChannelRule):
    """``channel_scale(x, s)`` carries x's channels; ``s`` is one of its members."""

    def __call__(self, node, st):
        x = node.args[0]
        if x not in st.space or st.space[x].dim != 1:
            return False
        st.add(st.space[x].sid, ScaleParam(node))
        return st.carry(node, x)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.s = nn.Parameter(torch.linspace(0.5, 2.0, 8))

    def forward(self, x):
        return self.b(torch.ops.fxopt_test.channel_scale(self.a(x), self.s)).mean((2, 3))


def test_a_custom_rule_object_with_its_own_member_prunes_a_custom_op():
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(2, 3, 6, 6)
    gm = fxopt.trace(model, (x,))
    assert not next(g for g in channel_groups(gm) if g.size == 8).prunable   # unknown op: kept whole
    register_channel_rule(torch.ops.fxopt_test.channel_scale, ChannelScaleRule())
    try:
        g = next(g for g in channel_groups(gm) if g.size == 8)
        assert g.prunable and len(g.of(ScaleParam)) == 1
        out, rec = prune(model, x)
        assert widths(out)["a_conv2d"][0] == 4 and widths(out)["b_conv2d"][1] == 4
        scale = next(n for n in out.graph.nodes if n.target is torch.ops.fxopt_test.channel_scale.default)
        assert tuple(getattr(out, scale.args[1].target).shape) == (4,)
        # the kept channels compute what they computed before: zeroing the pruned ones in the
        # original gives the same output
        kept = torch.zeros(8, dtype=torch.bool)
        keep_rows = getattr(out, next(n for n in out.graph.nodes if n.name == "a_conv2d").args[1].target)
        for row in keep_rows:
            kept |= (model.a.weight == row).flatten(1).all(1)
        ref = Scaled().eval()
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            ref.s[~kept] = 0
            assert torch.allclose(out(x), ref(x), atol=1e-5)
    finally:
        CHANNEL_RULES.pop(torch.ops.fxopt_test.channel_scale.default, None)


def test_bad_rules_are_typed_errors():
    with pytest.raises(fxopt.PipelineError, match="ChannelRule"):
        register_channel_rule(torch.ops.fxopt_test.channel_scale, lambda node, st: True)
    with pytest.raises(fxopt.PipelineError):
        channel_rules.register_builtin(type("Bad", (ChannelRule,), {"phase": "later"}))


def test_the_analysis_never_mutates_the_graph():
    gm = fxopt.trace(Cat().eval(), torch.randn(1, 3, 4, 4))
    before = gm.code
    metas = {n.name: dict(n.meta) for n in gm.graph.nodes}
    ChannelGroupsAnalysis().run(gm)
    assert gm.code == before and {n.name: dict(n.meta) for n in gm.graph.nodes} == metas

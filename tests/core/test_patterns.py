import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.dialect import aten


class SwishNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return h * torch.sigmoid(h) + torch.sigmoid(x) * 2


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_user_rewrite_replaces_and_counts():
    def pattern(x):
        return x * torch.sigmoid(x)

    def replacement(x):
        return F.silu(x)

    fxopt.register_rewrites("t-swish", [fxopt.Rewrite(pattern, replacement)])
    x = torch.randn(4, 8)
    model = SwishNet().eval()
    out = fxopt.compile(model, (x,), recipe="t-swish,cleanup", strict=True)
    assert count(out, aten.silu.default) == 1 and count(out, aten.sigmoid.default) == 1
    rec = out.fxopt_history.records[0]
    (label,) = rec.info["rewrites"]
    assert label.startswith("pattern@test_patterns.py:") and rec.info["rewrites"][label] == 1
    assert torch.allclose(out(x), model(x), atol=1e-6)


def test_where_filters_matches():
    rule = fxopt.Rewrite(lambda x, y: x * y, lambda x, y: y * x, name="swap",
                         where=lambda m: m.shape("x")[-1] == 3)

    class M(torch.nn.Module):
        def forward(self, a, c, b, d):
            return (a * c).sum() + (b * d).sum()
    fxopt.register_rewrites("t-swap", [rule])
    args = (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 5), torch.randn(2, 5))
    out = fxopt.compile(M(), args, recipe="t-swap", dynamic=False)
    assert out.fxopt_history.records[0].info["rewrites"][rule.label] == 1


def test_a_pattern_that_never_matches_reports_zero():
    never = fxopt.Rewrite(lambda x: torch.cos(torch.sin(x)), lambda x: x, name="never")
    fxopt.register_rewrites("t-never", [never])
    out = fxopt.compile(SwishNet(), (torch.randn(2, 8),), recipe="t-never", strict=True)
    rec = out.fxopt_history.records[0]
    assert rec.status == "unchanged" and rec.info["rewrites"] == {never.label: 0}


def test_rules_compose_with_plus_and_index_by_anchor():
    a = fxopt.Rewrite(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), name="a")
    b = fxopt.Rewrite(lambda x: torch.cos(torch.sin(x)), lambda x: x, name="b")
    rules = a + b
    assert len(rules) == 2 and [r.name for r in rules] == ["a", "b"]
    assert a.anchor() is aten.mul.Tensor and b.anchor() is aten.cos.default
    assert b._pattern_gm is None  # never captured: its anchor op is not in the graph below
    fxopt.register_rewrites("t-plus", rules)
    fxopt.compile(SwishNet(), (torch.randn(2, 8),), recipe="t-plus")
    assert b._pattern_gm is None


def test_a_rewrite_that_changes_numerics_is_rolled_back():
    fxopt.register_rewrites("t-wrong", [fxopt.Rewrite(lambda x: torch.sigmoid(x), lambda x: torch.tanh(x))])
    with pytest.warns(UserWarning, match="t-wrong"):
        out = fxopt.compile(SwishNet(), (torch.randn(2, 8),), recipe="t-wrong")
    assert out.fxopt_history.records[0].status == "rolled-back"


@pytest.mark.parametrize("where, message", [
    (lambda m: m.shape("xx")[-1] == 3, "no input named 'xx'; its inputs are x, y"),  # a typo'd input name
    (lambda m: m.shape("x").nonexistent, "where= raised AttributeError"),         # a bug in the check
])
def test_a_where_that_cannot_run_is_an_error_naming_the_rule_not_a_disabled_rule(where, message):
    rule = fxopt.Rewrite(lambda x, y: x * y, lambda x, y: y * x, name="broken-where", where=where)
    fxopt.register_rewrites("t-broken-where", [rule])
    class Mul(torch.nn.Module):
        def forward(self, a, b):
            return a * b
    args = (torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.compile(Mul(), args, recipe="t-broken-where", strict=True)
    with pytest.warns(UserWarning, match="t-broken-where"):  # non-strict: rolled back, and named
        out = fxopt.compile(Mul(), args, recipe="t-broken-where")
    assert out.fxopt_history.failures[0].name == "t-broken-where"

import sympy
import torch

import fxopt
from fxopt.passes.analysis.cost import CostAnalysis
from models import MLP, ResCNN


def cost_of(model, *args, **kw):
    gm = fxopt.trace(model, args, **kw)
    return gm, CostAnalysis().run(gm)


def test_linear_flops_are_exact_and_symbolic_in_batch():
    gm, c = cost_of(MLP(16, 32, 4), torch.randn(3, 16))
    (b,) = [sympy.Symbol(k, integer=True, positive=True) for k in c.symbols]
    assert c.symbols[str(b)] == "x.shape[0]"
    macs = 16 * 32 + 32 * 4
    # linears: 2*MACs per row; relu: 32 per row
    assert sympy.expand(c.total_macs - macs * b) == 0
    assert c.at(**{str(b): 5})["macs"] == 5 * macs
    assert c.at(**{str(b): 5})["flops"] == 5 * (2 * macs + 32)
    assert c.total_params == 16 * 32 + 32 + 32 * 4 + 4
    assert c.param_bytes == 4 * c.total_params


def test_conv_flops_static():
    model = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1, bias=False).eval()
    _, c = cost_of(model, torch.randn(2, 3, 10, 10), dynamic=False)
    assert c.total_macs == 2 * 8 * 10 * 10 * 3 * 3 * 3
    grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False).eval()
    _, c = cost_of(grouped, torch.randn(1, 8, 5, 5), dynamic=False)
    assert c.total_macs == 8 * 5 * 5 * 2 * 3 * 3  # C_in/groups = 2


def test_attention_flops():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q = torch.randn(2, 4, 6, 8)
    k = v = torch.randn(2, 4, 10, 8)
    _, c = cost_of(Attn(), q, k, v, dynamic=False)
    assert c.total_macs == 2 * 4 * 6 * 10 * 8 * 2


def test_views_are_free():
    class V(torch.nn.Module):
        def forward(self, x):
            return x.view(-1).reshape(2, -1).t()
    gm, c = cost_of(V(), torch.randn(2, 6), dynamic=False)
    assert c.total_flops == 0 and c.total_bytes == 0


def test_resnet_cost_matches_published_macs(torchvision_models):
    # torchvision documents ResNet-18 at 1.81 GFLOPs (multiply-adds) for 224x224
    gm, c = cost_of(torchvision_models.resnet18().eval(), torch.randn(1, 3, 224, 224), dynamic=False)
    assert abs(c.total_macs / 1.814e9 - 1) < 0.01
    assert c.total_params == sum(p.numel() for p in torchvision_models.resnet18().parameters()) + \
        sum(b.numel() for b in torchvision_models.resnet18().buffers())


def test_cost_cache_reuses_unchanged_nodes_and_never_writes_the_graph(monkeypatch):
    from fxopt.passes.analysis import cost
    gm, c1 = cost_of(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    metas = {n.name: dict(n.meta) for n in gm.graph.nodes}
    calls = []
    monkeypatch.setattr(cost, "node_cost", lambda *a: calls.append(a) or cost.NodeCost())
    c2 = CostAnalysis().run(gm)
    assert c1.per_node == c2.per_node and not calls   # every node from the value-keyed cache
    assert {n.name: dict(n.meta) for n in gm.graph.nodes} == metas


def test_the_cost_cache_follows_in_place_edits_without_clearing():
    import torch.nn.functional as F
    from fxopt.ir.meta import propagate_meta
    from fxopt.passes.analysis.cost import CostAnalysis, _key

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return F.gelu(self.conv(x))
    gm = fxopt.trace(Net().eval(), torch.randn(1, 3, 16, 16), dynamic=False)
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    gelu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default)
    before = CostAnalysis().run(gm).per_node[conv.name].flops
    k = _key(gelu)
    gelu.kwargs = {"approximate": "tanh"}  # a keyword changed in place: another key
    assert _key(gelu) != k
    conv.args = (*conv.args[:3], [2, 2], *conv.args[4:])  # stride 2: a quarter of the outputs
    for n in gm.graph.nodes:
        n.meta.pop("val", None) if n.op == "call_function" else None
    propagate_meta(gm)
    after = CostAnalysis().run(gm).per_node[conv.name].flops  # no cache cleared by hand
    assert after * 4 == before, (before, after)

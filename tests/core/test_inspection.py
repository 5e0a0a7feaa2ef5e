"""summary, diff and render."""
import xml.etree.ElementTree as ET

import pytest
import torch

import fxopt
from models import Redundant, ResCNN


@pytest.fixture(scope="module")
def before_after():
    x = torch.randn(8, 8)
    model = Redundant().eval()
    return fxopt.trace(model, (x,)), fxopt.compile(model, (x,))


def test_summary_rows_and_totals():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    s = fxopt.summary(gm)
    assert len(s.rows) == len(gm.graph.nodes)
    conv = next(r for r in s.rows if r.op == "conv2d")
    assert conv.module == "conv1" and conv.shape.endswith("x8x8x8") and conv.dtype == "float32"
    assert s.totals["params"] == sum(t.numel() for t in ResCNN().state_dict().values())
    text = s.text(color=False)
    assert "conv1" in text and "total" in text and "s77 = x.shape[0]" in text and "\033[" not in text
    assert "\033[" in s.text(color=True)


def test_summary_groups_by_module_depth():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    s = fxopt.summary(gm, depth=1)
    mods = {r.module for r in s.rows}
    assert {"conv1", "bn1", "conv2", "bn2", "head"} <= mods
    assert sum(r.count for r in s.rows) == len(gm.graph.nodes)
    assert sum(r.params for r in s.rows) == fxopt.summary(gm).totals["params"]
    whole = fxopt.summary(gm, depth=0)
    assert "" in {r.module for r in whole.rows}


def test_diff_names_removed_added_and_rewired(before_after):
    before, after = before_after
    d = fxopt.diff(before, after)
    removed = {n.name for n in d.removed}
    assert {"mul", "add", "div", "clone"} <= removed
    assert [n.name for n in d.added] == [n.name for n in after.graph.nodes if n.name.startswith("_folded_")]
    assert any(c.name == "relu" for c in d.rewired)
    text = d.text()
    assert text.startswith(f"graph diff: {len(before.graph.nodes)} -> {len(after.graph.nodes)} nodes")
    assert "- mul = mul(fc_linear)" in text
    assert not fxopt.diff(after, after) and "(no changes)" in fxopt.diff(after, after).text()


def test_diff_reports_retyped_nodes():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    import copy
    other = copy.deepcopy(gm)
    relu = next(n for n in other.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.gelu.default
    d = fxopt.diff(gm, other)
    assert [c.name for c in d.retyped] == [relu.name] and "op relu -> gelu" in d.retyped[0].what[0]


def _parse_svg(text):
    root = ET.fromstring(text)
    assert root.tag.endswith("svg")
    return root


def test_render_svg_is_well_formed_and_highlights(before_after, tmp_path):
    before, after = before_after
    svg = fxopt.render(after, tmp_path / "a.svg", previous=before, show_params=True)
    root = _parse_svg(svg)
    classes = [g.get("class", "") for g in root.iter("{http://www.w3.org/2000/svg}g")]
    assert any("added" in c for c in classes) and any("changed" in c for c in classes)
    assert (tmp_path / "a.svg").read_text() == svg
    red = fxopt.render(before, next=after)
    assert any("removed" in g.get("class", "") for g in _parse_svg(red).iter("{http://www.w3.org/2000/svg}g"))


def test_render_escapes_every_label():
    from fxopt.ir.snapshot import GraphSnapshot, NodeInfo
    evil = "a<b>&\"c'</text><script>x</script>"
    nodes = (NodeInfo(evil, "placeholder", evil, (), "2x3", "float32", evil, "capture", evil, "input"),
             NodeInfo("y", "call_function", evil, (evil,), "2x3", "float32", evil + ".sub", evil, evil, "compute"),
             NodeInfo("output", "output", "output", ("y",), "", "", "", "capture", "output", "output"))
    snap = GraphSnapshot(nodes, "")
    for kw in ({}, {"depth": 0}):
        svg = fxopt.render(snap, title=evil, **kw)
        _parse_svg(svg)
        assert "<script>" not in svg
    dot = fxopt.render(snap, fmt="dot")
    assert dot.startswith("digraph") and dot.rstrip().endswith("}") and '\\"c' in dot


def test_render_collapses_large_graphs(torchvision_models):
    gm = fxopt.trace(torchvision_models.densenet121().eval(), torch.randn(1, 3, 64, 64))
    assert len(gm.graph.nodes) > 1000
    svg = fxopt.render(gm, max_nodes=150)
    root = _parse_svg(svg)
    boxes = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if "node" in g.get("class", "").split()]
    assert 0 < len(boxes) <= 150
    assert "modules collapsed below depth" in svg
    assert len(svg) < 400_000

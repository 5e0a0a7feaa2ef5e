import networkx as nx
import torch

import fxopt
from fxopt.passes.analysis.shapes import ShapeAnalysis, TensorInfo
from models import DictOut, ResCNN


def test_shapes_are_symbolic_where_dynamic():
    gm = fxopt.trace(DictOut().eval(), kwargs={"input_ids": torch.randint(0, 50, (2, 5))}, dynamic=True)
    shapes = ShapeAnalysis().run(gm)
    info = shapes["input_ids"]
    assert isinstance(info, TensorInfo) and info.dtype == torch.int64
    assert all(not isinstance(s, int) for s in info.shape)
    logits = next(v for k, v in shapes.items() if k.endswith("linear"))
    assert logits.shape[-1] == 3 and str(logits).startswith("float32[")


def test_shapes_fill_in_nodes_that_passes_create():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        new = gm.graph.call_function(torch.ops.aten.sigmoid.default, (relu,))
    assert "val" not in new.meta
    shapes = ShapeAnalysis().run(gm)
    assert shapes[new.name] == shapes[relu.name]
    assert "val" not in new.meta   # computed, not written: an analysis never mutates the graph


def test_graph_view_mirrors_the_graph():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(2, 3, 8, 8))
    g = fxopt.AnalysisManager().get("graph-view", gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("conv1_"))
    assert g.nodes[conv.name]["module"] == "conv1" and g.has_edge("conv1_weight", conv.name)

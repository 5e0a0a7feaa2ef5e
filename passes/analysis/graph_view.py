"""``graph-view``: the graph as a ``networkx.DiGraph`` for analyses that need graph algorithms."""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis
from fxopt.ir.dialect import module_path, op_name

__all__ = ["GraphViewAnalysis", "to_networkx"]


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """One vertex per node (attributes: op, target, module, created_by), one edge per data dependency."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=op_name(n), module=module_path(n),
                   created_by=n.meta.get("fxopt_created_by", "capture"))
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


@register_analysis
class GraphViewAnalysis(Analysis):
    """A ``networkx.DiGraph`` mirror of the fx graph (see :func:`to_networkx`)."""

    name = "graph-view"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> nx.DiGraph:
        return to_networkx(gm)

    def same(self, cached: nx.DiGraph, fresh: nx.DiGraph, gm: fx.GraphModule) -> bool:
        return nx.utils.graphs_equal(cached, fresh)

"""``provenance``: which pass created each node (``"capture"`` for nodes from the front-end).

The pass manager stamps ``node.meta["fxopt_created_by"]`` on every node a pass adds.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis

__all__ = ["ProvenanceAnalysis"]


@register_analysis
class ProvenanceAnalysis(Analysis):
    """Per node name: the name of the pass that created it."""

    name = "provenance"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> dict[str, str]:
        return {n.name: n.meta.get("fxopt_created_by", "capture") for n in gm.graph.nodes}

    def same(self, cached: dict, fresh: dict, gm: fx.GraphModule) -> bool:
        return all(cached.get(k) == v for k, v in fresh.items())

"""Analyses: shapes, cost, channel groups (and their channel layouts), provenance, graph view. Importing registers them."""
from fxopt.passes.analysis import shapes, cost, dependency, channel_layouts, provenance, graph_view  # noqa: F401

__all__ = ['shapes', 'cost', 'dependency', 'channel_layouts', 'provenance', 'graph_view']

"""fxopt's built-in passes and analyses, one module per family. Importing registers them."""
from . import cleanup, cost, graph_view, provenance, shapes  # noqa: F401

__all__ = ["cleanup", "cost", "graph_view", "provenance", "shapes"]

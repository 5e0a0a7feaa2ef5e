"""fxopt's built-in passes and analyses, one module per family. Importing registers them."""
from . import (activations, attention, canonicalize, cleanup, cost, fold_bn, fuse_qkv, graph_view,  # noqa: F401
               low_rank, provenance, shapes, sparsity)

__all__ = ["activations", "attention", "canonicalize", "cleanup", "cost", "fold_bn", "fuse_qkv", "graph_view",
           "low_rank", "provenance", "shapes", "sparsity"]

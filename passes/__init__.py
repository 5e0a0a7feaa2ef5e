"""fxopt's built-in passes and analyses, one module per family. Importing registers them."""
from . import (activations, attention, canonicalize, cast, cleanup, cost, dependency, fold_bn, fuse_qkv,  # noqa: F401
               graph_view, low_rank, lower_quant, lower_sparse, provenance, prune, quantize, shapes, smooth_quant, sparsity)

__all__ = ["activations", "attention", "canonicalize", "cast", "cleanup", "cost", "dependency", "fold_bn", "prune", "fuse_qkv", "graph_view",
           "low_rank", "lower_quant", "lower_sparse", "provenance", "quantize", "shapes", "smooth_quant", "sparsity"]

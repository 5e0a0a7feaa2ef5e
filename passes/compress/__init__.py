"""Compression: structured pruning, sparsity, low-rank factorization. Importing registers them."""
from fxopt.passes.compress import prune, sparsity, low_rank  # noqa: F401

__all__ = ['prune', 'sparsity', 'low_rank']

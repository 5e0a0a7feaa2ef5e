"""Cleanup and canonicalization passes. Importing registers them."""
from fxopt.passes.cleanup import cleanup, canonicalize  # noqa: F401

__all__ = ['cleanup', 'canonicalize']

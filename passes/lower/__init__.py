"""Lowering: simulated QDQ and sparse patterns to the kernels of ``fxopt.kernels``. Importing registers them."""
from fxopt.passes.lower import lower_quant, lower_sparse  # noqa: F401

__all__ = ['lower_quant', 'lower_sparse']

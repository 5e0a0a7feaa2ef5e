"""Lowering: simulated QDQ and sparse patterns to the kernels of ``fxopt.kernels``, by the table of
:mod:`fxopt.passes.lower.rules`. Importing registers them."""
from fxopt.passes.lower import lower_quant, lower_sparse, rules, rules_cuda  # noqa: F401

__all__ = ['lower_quant', 'lower_sparse', 'rules', 'rules_cuda']

"""fxopt's built-in passes and analyses, grouped by family (one subpackage each, one module per
pass). Importing registers them; ``fxopt.get_pass(name)`` finds any of them by name."""
from fxopt.passes import analysis, cleanup, compress, fusion, lower, quant  # noqa: F401

__all__ = ["analysis", "cleanup", "compress", "fusion", "lower", "quant"]

"""Quantization passes: QDQ insertion, SmoothQuant, dtype casting. Importing registers them."""
from fxopt.passes.quant import quantize, smooth_quant, cast  # noqa: F401

__all__ = ['quantize', 'smooth_quant', 'cast']

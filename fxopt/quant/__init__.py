"""Quantization support the passes share: specs (``QSpec``), the QDQ ops, observers, calibration
and per-layer sensitivity."""

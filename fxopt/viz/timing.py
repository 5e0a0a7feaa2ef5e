"""Timing helpers: medians over repeats after a warm-up, without autograd."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3

"""Helpers the benchmark scripts share: a plain-text table of dict rows."""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["table", "interleaved_ms"]


def table(rows: list[dict]) -> str:
    """Columns from the first row's keys, left-aligned, a dashed rule under the header."""
    cols = list(rows[0])
    widths = [max(len(str(r[c])) for r in rows + [dict(zip(cols, cols))]) for c in cols]

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths))
    return "\n".join([line(dict(zip(cols, cols))), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms per named callable after one warm-up call each, timed round-robin so that drift in the
    machine's speed hits every callable alike."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}

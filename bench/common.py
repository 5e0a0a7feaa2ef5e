"""Helpers the benchmark scripts share: a plain-text table of dict rows."""
from __future__ import annotations

__all__ = ["table"]


def table(rows: list[dict]) -> str:
    """Columns from the first row's keys, left-aligned, a dashed rule under the header."""
    cols = list(rows[0])
    widths = [max(len(str(r[c])) for r in rows + [dict(zip(cols, cols))]) for c in cols]

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths))
    return "\n".join([line(dict(zip(cols, cols))), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])

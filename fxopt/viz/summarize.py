"""``fxopt.summary``: one row per node (or per module), with shapes, dtypes, parameters, FLOPs, bytes.

    >>> import torch, fxopt
    >>> s = fxopt.summary(fxopt.trace(torch.nn.Linear(4, 2), torch.randn(3, 4)))
    >>> s.totals["params"]
    10
    >>> "linear" in s.text(color=False)
    True

``summary(gm, depth=2)`` groups rows by module path cut at that depth. Shapes
and FLOPs are symbolic where the graph is dynamic (``s77`` = the batch size,
listed under the table).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch.fx as fx

from fxopt.ir.snapshot import GraphSnapshot, NodeInfo

__all__ = ["Summary", "summary", "as_snapshot", "fmt_count"]


def as_snapshot(obj: Any) -> GraphSnapshot:
    """A GraphSnapshot from a GraphModule (costs computed), a snapshot, or a compiled module's final graph."""
    if isinstance(obj, GraphSnapshot):
        return obj
    if isinstance(obj, fx.GraphModule):
        from fxopt.passmgr.analysis import AnalysisManager
        return GraphSnapshot.of(obj, AnalysisManager().get("cost", obj).per_node)
    raise TypeError(f"expected a GraphModule (from fxopt.trace/compile) or a GraphSnapshot, got {type(obj).__name__}")


def fmt_count(v: Any) -> str:
    """1234567 -> 1.23M; sympy expressions per term ('1.26M*s77')."""
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        try:
            v = sympy.sympify(v)
        except (sympy.SympifyError, TypeError):
            return v
    if isinstance(v, sympy.Expr) and not v.is_number:
        terms = sympy.Add.make_args(sympy.expand(v))
        out = []
        for t in terms:
            coeff, rest = t.as_coeff_Mul()
            syms = str(rest) if rest != 1 else ""
            c = fmt_count(int(coeff)) if coeff != 1 or not syms else ""
            out.append("*".join(x for x in (c, syms) if x))
        return " + ".join(out)
    v = int(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, str):
        a = sympy.sympify(a)
    if isinstance(b, str):
        b = sympy.sympify(b)
    return a + b


@dataclass
class Row:
    name: str
    op: str
    target: str
    module: str
    shape: str
    dtype: str
    params: int
    flops: Any
    bytes: Any
    family: str = "other"
    count: int = 1


@dataclass
class Summary:
    """Rows plus totals; ``str()`` is the plain-text table, ``text(color=True)`` adds ANSI colour."""

    rows: list
    totals: dict
    symbols: dict = field(default_factory=dict)
    depth: int | None = None

    def text(self, color: bool | None = None, max_rows: int | None = None) -> str:
        if color is None:
            color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
        grouped = self.depth is not None
        head = (["module", "nodes", "ops", "params", "FLOPs", "bytes"] if grouped else
                ["name", "op", "module", "shape", "dtype", "params", "FLOPs", "bytes"])
        body = []
        rows = self.rows if max_rows is None or len(self.rows) <= max_rows else self.rows[:max_rows]
        for r in rows:
            if grouped:
                body.append(([r.module or "<root>", str(r.count), r.op, fmt_count(r.params) if r.params else "",
                              fmt_count(r.flops) if r.flops else "", fmt_count(r.bytes) if r.bytes else ""], r.family))
            else:
                body.append(([r.name, r.op, r.module, r.shape, r.dtype, fmt_count(r.params) if r.params else "",
                              fmt_count(r.flops) if r.flops else "", fmt_count(r.bytes) if r.bytes else ""], r.family))
        t = self.totals
        total = (["total", str(t["nodes"]), "", fmt_count(t["params"]), fmt_count(t["flops"]), fmt_count(t["bytes"])]
                 if grouped else ["total", f"{t['nodes']} nodes", "", "", "", fmt_count(t["params"]),
                                  fmt_count(t["flops"]), fmt_count(t["bytes"])])
        widths = [max(len(x) for x in col) for col in zip(head, total, *[b[0] for b in body])]
        right = {"nodes", "params", "FLOPs", "bytes"}

        def line(cells: list[str], style: str = "") -> str:
            parts = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, head)]
            text = "  ".join(parts).rstrip()
            return f"{style}{text}\033[0m" if color and style else text
        out = [line(head, "\033[1m"), "  ".join("-" * w for w in widths)]
        for cells, fam in body:
            out.append(line(cells, _ANSI.get(fam, "")))
        if len(rows) < len(self.rows):
            out.append(f"... {len(self.rows) - len(rows)} more rows")
        out.append("  ".join("-" * w for w in widths))
        out.append(line(total, "\033[1m"))
        out.append(f"model bytes (parameters and buffers): {fmt_count(t['param_bytes'])}; "
                   "bytes column = memory traffic estimate")
        if self.symbols:
            out.append("symbols: " + ", ".join(f"{k} = {v}" for k, v in self.symbols.items()))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.text(color=False)


_ANSI = {"compute": "\033[36m", "norm": "\033[35m", "quant": "\033[33m", "cast": "\033[33m",
         "sparse": "\033[32m", "fused": "\033[32;1m", "param": "\033[2m", "view": "\033[2m",
         "input": "\033[1m", "output": "\033[1m"}


def summary(obj: Any, depth: int | None = None, include_params: bool = True) -> Summary:
    """Summarize a GraphModule or GraphSnapshot.

    ``depth``: group rows by the module path cut at that many components (0 = whole model).
    ``include_params``: list ``get_attr`` nodes as their own rows (ungrouped view only).
    """
    snap = as_snapshot(obj)
    symbols = {}
    if isinstance(obj, fx.GraphModule):
        from fxopt.ir.meta import input_symbols
        symbols = input_symbols(obj)
    nodes = list(snap.nodes)
    flops: Any = 0
    nbytes: Any = 0
    params = 0
    for n in nodes:
        flops, nbytes, params = _add(flops, n.flops), _add(nbytes, n.bytes), params + n.params
    totals = {"nodes": len(nodes), "params": params, "param_bytes": _param_bytes(nodes), "flops": flops,
              "bytes": nbytes}
    if depth is None:
        rows = [Row(n.name, n.opname, n.target, n.module, n.shape, n.dtype, n.params, n.flops, n.bytes, n.family)
                for n in nodes if include_params or n.op != "get_attr"]
        return Summary(rows, totals, symbols)
    groups: dict[str, Row] = {}
    ops: dict[str, dict[str, int]] = {}
    for n in nodes:
        if n.op in ("placeholder", "output"):
            key = f"<{n.op}>"
        else:
            key = ".".join(n.module.split(".")[:depth]) if depth > 0 and n.module else ""
        r = groups.get(key)
        if r is None:
            r = groups[key] = Row(key, "", "", key, "", "", 0, 0, 0, n.family, 0)
            ops[key] = {}
        r.count += 1
        r.params += n.params
        r.flops = _add(r.flops, n.flops)
        r.bytes = _add(r.bytes, n.bytes)
        if n.op == "call_function":
            ops[key][n.opname] = ops[key].get(n.opname, 0) + 1
    for key, r in groups.items():
        common = sorted(ops[key].items(), key=lambda kv: -kv[1])[:3]
        r.op = ", ".join(f"{k}x{v}" if v > 1 else k for k, v in common)
    return Summary(list(groups.values()), totals, symbols, depth)


def _param_bytes(nodes: list[NodeInfo]) -> int:
    import torch
    def itemsize(dtype: str) -> int:
        d = getattr(torch, dtype, None)
        return d.itemsize if isinstance(d, torch.dtype) else 4
    return sum(n.params * itemsize(n.dtype) for n in nodes if n.op == "get_attr")

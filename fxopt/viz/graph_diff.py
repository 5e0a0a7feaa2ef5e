"""``fxopt.diff``: what changed between two graphs, node by node.

Nodes are matched by name (passes keep the names of nodes they do not touch).
A node is *added* or *removed* when its name appears on one side only,
*retyped* when its op, target, shape or dtype changed, and *rewired* when it
reads different inputs.

    >>> import torch, fxopt
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x * 1)
    >>> before = fxopt.trace(M(), torch.randn(2, 3))
    >>> after = fxopt.compile(M(), (torch.randn(2, 3),))
    >>> d = fxopt.diff(before, after)
    >>> [n.name for n in d.removed], [n.name for n in d.rewired]
    (['mul'], ['relu'])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxopt.ir.snapshot import NodeInfo
from fxopt.viz.summarize import as_snapshot

__all__ = ["GraphDiff", "diff"]


@dataclass
class Change:
    before: NodeInfo
    after: NodeInfo
    what: list

    @property
    def name(self) -> str:
        return self.after.name


@dataclass
class GraphDiff:
    added: list = field(default_factory=list)       # NodeInfo
    removed: list = field(default_factory=list)     # NodeInfo
    retyped: list = field(default_factory=list)     # Change
    rewired: list = field(default_factory=list)     # Change
    before_nodes: int = 0
    after_nodes: int = 0

    @property
    def changed_names(self) -> set[str]:
        return {n.name for n in self.added} | {c.name for c in self.retyped} | {c.name for c in self.rewired}

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.retyped or self.rewired)

    def text(self, color: bool = False, limit: int = 60) -> str:
        def paint(code: str, s: str) -> str:
            return f"\033[{code}m{s}\033[0m" if color else s
        lines = [f"graph diff: {self.before_nodes} -> {self.after_nodes} nodes; {len(self.added)} added, "
                 f"{len(self.removed)} removed, {len(self.retyped)} retyped, {len(self.rewired)} rewired"]

        def node(n: NodeInfo) -> str:
            where = f" in {n.module}" if n.module else ""
            shape = f" -> {n.dtype}[{n.shape}]" if n.shape else ""
            return f"{n.name} = {n.opname or n.op}({', '.join(n.inputs)}){shape}{where}"
        for title, items, code, fn in (
                ("removed", self.removed, "31", lambda n: "- " + node(n)),
                ("added", self.added, "32", lambda n: "+ " + node(n)),
                ("retyped", self.retyped, "33", lambda c: "~ " + node(c.after) + "  [" + "; ".join(c.what) + "]"),
                ("rewired", self.rewired, "34", lambda c: "> " + node(c.after) + "  [" + "; ".join(c.what) + "]")):
            if not items:
                continue
            lines.append(paint("1", f"{title} ({len(items)}):"))
            for item in items[:limit]:
                lines.append("  " + paint(code, fn(item)))
            if len(items) > limit:
                lines.append(f"  ... {len(items) - limit} more")
        if not self:
            lines.append("(no changes)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def diff(before: Any, after: Any) -> GraphDiff:
    """Compare two graphs (GraphModules or GraphSnapshots)."""
    a, b = as_snapshot(before), as_snapshot(after)
    old, new = a.by_name(), b.by_name()
    d = GraphDiff(before_nodes=len(a), after_nodes=len(b))
    d.removed = [n for n in a.nodes if n.name not in new]
    d.added = [n for n in b.nodes if n.name not in old]
    for n in b.nodes:
        o = old.get(n.name)
        if o is None:
            continue
        what = []
        if (o.op, o.target) != (n.op, n.target):
            what.append(f"op {o.opname or o.op} -> {n.opname or n.op}")
        if o.shape != n.shape:
            what.append(f"shape {o.shape or '?'} -> {n.shape or '?'}")
        if o.dtype != n.dtype:
            what.append(f"dtype {o.dtype or '?'} -> {n.dtype or '?'}")
        if what:
            d.retyped.append(Change(o, n, what))
        if o.inputs != n.inputs:
            d.rewired.append(Change(o, n, [f"inputs ({', '.join(o.inputs)}) -> ({', '.join(n.inputs)})"]))
    return d



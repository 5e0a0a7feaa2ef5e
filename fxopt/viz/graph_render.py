"""``fxopt.render``: draw a graph as SVG (or DOT) without system graphviz.

The layout is done here: longest-path layering of the DAG, then barycenter
sweeps to cut edge crossings. Nodes are coloured by family (compute, norm,
quantize/dequantize, cast, sparse, fused kernel, ...), labelled with op, shape
and dtype, and grouped by module. Large graphs collapse modules to a depth so
that at most ``max_nodes`` boxes are drawn (a 12-layer transformer or
densenet121 stays readable). With ``previous=`` the nodes that are new or
changed since that graph are highlighted; with ``next=`` the nodes that the
next graph removes are. Every label is XML-escaped.

    >>> import torch, fxopt
    >>> svg = fxopt.render(fxopt.trace(torch.nn.Linear(4, 2), torch.randn(3, 4)))
    >>> svg.startswith("<svg") and "linear" in svg
    True
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from fxopt.ir.snapshot import GraphSnapshot
from fxopt.viz.summarize import as_snapshot, fmt_count

__all__ = ["render", "layout", "FAMILY_COLORS"]

FAMILY_COLORS = {
    "input": "#ffe8a3", "output": "#ffe8a3", "param": "#eeeeee", "compute": "#a8d1ff", "norm": "#d9c2f0",
    "activation": "#c8ecc1", "elementwise": "#e4f2dc", "reduction": "#f6d7b8", "view": "#f2f2f2",
    "cast": "#ffd3a8", "quant": "#ffb3b3", "sparse": "#b8efe0", "fused": "#7fd6a4", "other": "#f7f7f7",
    "module": "#dfe9f7",
}
_HIGHLIGHT = {"added": "#1a7f37", "changed": "#d97706", "removed": "#c0392b"}
W, H, DX, DY = 176, 42, 196, 74


@dataclass
class Box:
    key: str
    label: str
    sub: str
    family: str
    tooltip: str
    order: int
    members: list = field(default_factory=list)
    state: str = ""       # "", "added", "changed", "removed"
    x: float = 0.0
    y: float = 0.0
    layer: int = 0


def _module_cut(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth]) if module else ""


def _boxes(snap: GraphSnapshot, depth: int | None, show_params: bool) -> tuple[dict, list]:
    # the export shape guard is plumbing, not part of the model
    nodes = [n for n in snap.nodes if (show_params or n.op != "get_attr")
             and not (n.op == "call_module" and n.name == "_guards_fn")]
    params_of: dict[str, int] = {}
    names = {n.name: n for n in snap.nodes}
    for n in snap.nodes:
        if not show_params:
            params_of[n.name] = sum(names[i].params for i in n.inputs if i in names and names[i].op == "get_attr")
    boxes: dict[str, Box] = {}
    owner: dict[str, str] = {}
    for i, n in enumerate(nodes):
        collapse = depth is not None and n.module and n.op not in ("placeholder", "output")
        key = f"module:{_module_cut(n.module, depth)}" if collapse else n.name  # type: ignore[arg-type]
        owner[n.name] = key
        if key in boxes:
            boxes[key].members.append(n)
            continue
        if collapse:
            boxes[key] = Box(key, _module_cut(n.module, depth), "", "module", "", i, [n])  # type: ignore[arg-type]
        else:
            shape = f"{n.dtype}[{n.shape}]" if n.shape else ""
            p = n.params + params_of.get(n.name, 0)
            sub = shape + (f"  {fmt_count(p)} params" if p else "")
            tip = "\n".join(x for x in (f"{n.name} = {n.target}", f"module: {n.module or '<root>'}",
                                        f"output: {shape}" if shape else "", f"params: {p}" if p else "",
                                        f"FLOPs: {n.flops}" if n.flops else "", f"created by: {n.created_by}") if x)
            label = n.opname if n.op == "call_function" else (n.name if n.op != "output" else "output")
            boxes[key] = Box(key, label, sub, n.family, tip, i, [n])
    for b in boxes.values():
        if b.family == "module":
            ops: dict[str, int] = {}
            fams: dict[str, int] = {}
            for m in b.members:
                if m.op == "call_function":
                    ops[m.opname] = ops.get(m.opname, 0) + 1
                    fams[m.family] = fams.get(m.family, 0) + 1
            p = sum(m.params + params_of.get(m.name, 0) for m in b.members)
            top = sorted(ops.items(), key=lambda kv: -kv[1])[:2]
            b.sub = ", ".join(f"{k}x{v}" if v > 1 else k for k, v in top) + (f"  {fmt_count(p)} params" if p else "")
            b.tooltip = f"module {b.label or '<root>'}: {len(b.members)} nodes\n" + \
                "\n".join(f"{k}: {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
            if fams and max(fams, key=fams.get) in ("quant", "sparse", "fused", "cast"):  # type: ignore[arg-type]
                b.family = max(fams, key=fams.get)  # type: ignore[arg-type]
    edges = set()
    for n in nodes:
        for i in n.inputs:
            if i in owner and owner[i] != owner[n.name]:
                edges.add((owner[i], owner[n.name]))
    return boxes, sorted(edges)


def _auto_depth(snap: GraphSnapshot, max_nodes: int, show_params: bool) -> int | None:
    visible = [n for n in snap.nodes if show_params or n.op != "get_attr"]
    if len(visible) <= max_nodes:
        return None
    deepest = max((len(n.module.split(".")) for n in visible if n.module), default=0)
    for d in range(deepest, -1, -1):
        keys = {(_module_cut(n.module, d) if n.module and n.op not in ("placeholder", "output") else n.name)
                for n in visible}
        if len(keys) <= max_nodes:
            return d
    return 0


def layout(boxes: dict, edges: list) -> tuple[float, float]:
    """Assign x/y to boxes: longest-path layers (back edges ignored), barycenter ordering."""
    order = {k: b.order for k, b in boxes.items()}
    preds: dict[str, list] = {k: [] for k in boxes}
    for u, v in edges:
        if order[u] < order[v]:
            preds[v].append(u)
    for k in sorted(boxes, key=order.get):  # type: ignore[arg-type]
        boxes[k].layer = 1 + max((boxes[p].layer for p in preds[k]), default=-1)
    layers: dict[int, list] = {}
    for k in sorted(boxes, key=order.get):  # type: ignore[arg-type]
        layers.setdefault(boxes[k].layer, []).append(k)
    pos = {}
    for li in sorted(layers):
        for i, k in enumerate(layers[li]):
            pos[k] = float(i)
    for _ in range(2):
        for li in sorted(layers)[1:]:
            def bary(k: str) -> float:
                ps = [pos[p] for p in preds[k]]
                return sum(ps) / len(ps) if ps else pos[k]
            layers[li].sort(key=bary)
            for i, k in enumerate(layers[li]):
                pos[k] = float(i)
    width = max(len(v) for v in layers.values()) if layers else 1
    for li, keys in layers.items():
        offset = (width - len(keys)) / 2
        for i, k in enumerate(keys):
            boxes[k].x = 20 + (offset + i) * DX
            boxes[k].y = 50 + li * DY
    return 40 + width * DX, 90 + len(layers) * DY


def _mark(boxes: dict, snap: GraphSnapshot, previous: Any, nxt: Any) -> dict:
    counts = {"added": 0, "changed": 0, "removed": 0}
    if previous is not None:
        old = as_snapshot(previous).by_name()
        for b in boxes.values():
            states = []
            for m in b.members:
                o = old.get(m.name)
                if o is None:
                    states.append("added")
                elif (o.target, o.inputs, o.shape, o.dtype) != (m.target, m.inputs, m.shape, m.dtype):
                    states.append("changed")
            if states:
                b.state = "added" if all(s == "added" for s in states) and b.family != "module" else "changed"
                counts[b.state] += 1
    if nxt is not None:
        new = as_snapshot(nxt).by_name()
        for b in boxes.values():
            if any(m.name not in new for m in b.members):
                b.state = "removed"
                counts["removed"] += 1
    return counts


def _svg(boxes: dict, edges: list, size: tuple, title: str, counts: dict, groups: bool) -> str:
    width, height = size
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{int(width)}" height="{int(height)}" '
           f'viewBox="0 0 {int(width)} {int(height)}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="20" y="22" font-size="14" font-weight="bold">{escape(_fit(title, width))}</text>']
    if groups:  # light frames around top-level modules
        frames: dict[str, list] = {}
        for b in boxes.values():
            mod = b.members[0].module.split(".")[0] if b.family != "module" and b.members[0].module else ""
            if mod:
                frames.setdefault(mod, []).append(b)
        for mod, bs in frames.items():
            if len(bs) < 2:
                continue
            x0, y0 = min(b.x for b in bs) - 6, min(b.y for b in bs) - 16
            x1, y1 = max(b.x for b in bs) + W + 6, max(b.y for b in bs) + H + 6
            out.append(f'<g class="module-frame"><rect x="{x0:.0f}" y="{y0:.0f}" width="{x1 - x0:.0f}" '
                       f'height="{y1 - y0:.0f}" rx="8" fill="#5b8def" fill-opacity="0.04" stroke="#5b8def" '
                       f'stroke-opacity="0.35" stroke-dasharray="4 3"/><text x="{x0 + 6:.0f}" y="{y0 + 11:.0f}" '
                       f'fill="#3d6fd6" font-size="10">{escape(mod)}</text></g>')
    for u, v in edges:
        a, b = boxes[u], boxes[v]
        x1, y1, x2, y2 = a.x + W / 2, a.y + H, b.x + W / 2, b.y
        if y2 <= y1:  # back edge: route around the right side
            out.append(f'<path d="M {x1:.0f} {a.y + H / 2:.0f} C {x1 + W:.0f} {a.y:.0f}, {x2 + W:.0f} {b.y + H:.0f}, '
                       f'{b.x + W:.0f} {b.y + H / 2:.0f}" fill="none" stroke="#bbb" stroke-dasharray="3 3" '
                       'marker-end="url(#arrow)"/>')
            continue
        my = (y1 + y2) / 2
        out.append(f'<path d="M {x1:.0f} {y1:.0f} C {x1:.0f} {my:.0f}, {x2:.0f} {my:.0f}, {x2:.0f} {y2:.0f}" '
                   'fill="none" stroke="#999" stroke-width="1" marker-end="url(#arrow)"/>')
    for b in boxes.values():
        fill = FAMILY_COLORS.get(b.family, "#f7f7f7")
        stroke, sw, dash = "#666", 1, ""
        if b.state:
            stroke, sw = _HIGHLIGHT[b.state], 3
            dash = ' stroke-dasharray="6 3"' if b.state == "removed" else ""
        label = b.label if len(b.label) <= 26 else b.label[:25] + "…"
        sub = b.sub if len(b.sub) <= 32 else b.sub[:31] + "…"
        out.append(f'<g class="node {escape(b.family)} {b.state}" data-name={quoteattr(b.key)}>'
                   f'<title>{escape(b.tooltip)}</title>'
                   f'<rect x="{b.x:.0f}" y="{b.y:.0f}" width="{W}" height="{H}" rx="6" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="{sw}"{dash}/>'
                   f'<text x="{b.x + W / 2:.0f}" y="{b.y + 17:.0f}" text-anchor="middle" font-weight="bold">'
                   f'{escape(label)}</text>'
                   f'<text x="{b.x + W / 2:.0f}" y="{b.y + 32:.0f}" text-anchor="middle" fill="#444" '
                   f'font-size="10">{escape(sub)}</text></g>')
    # legend
    fams = []
    for b in boxes.values():
        if b.family not in fams:
            fams.append(b.family)
    x = 20.0
    y = height - 22
    for fam in fams:
        out.append(f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="12" height="12" fill="{FAMILY_COLORS.get(fam)}" '
                   f'stroke="#666"/><text x="{x + 16:.0f}" y="{y:.0f}">{escape(fam)}</text>')
        x += 30 + 7 * len(fam)
    for state, n in counts.items():
        if n:
            out.append(f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="12" height="12" fill="white" '
                       f'stroke="{_HIGHLIGHT[state]}" stroke-width="3"/><text x="{x + 16:.0f}" y="{y:.0f}">'
                       f'{escape(state)} ({n})</text>')
            x += 50 + 7 * len(state)
    out.append("</svg>")
    return "\n".join(out)


def _fit(text: str, width: float) -> str:
    room = max(20, int((width - 40) / 7.5))
    return text if len(text) <= room else "…" + text[-(room - 1):]


def _dot(boxes: dict, edges: list, title: str) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    lines = ["digraph fxopt {", f"  label={q(title)}; labelloc=t; rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    clusters: dict[str, list] = {}
    for b in boxes.values():
        mod = b.members[0].module.split(".")[0] if b.family != "module" and b.members[0].module else ""
        clusters.setdefault(mod, []).append(b)
    for mod, bs in clusters.items():
        indent = "  "
        if mod:
            lines.append(f"  subgraph {q('cluster_' + mod)} {{ label={q(mod)}; style=dashed; color=\"#5b8def\";")
            indent = "    "
        for b in bs:
            attrs = [f"label={q(b.label + (chr(10) + b.sub if b.sub else ''))}",
                     f'fillcolor="{FAMILY_COLORS.get(b.family, "#f7f7f7")}"', f"tooltip={q(b.tooltip)}"]
            if b.state:
                attrs += [f'color="{_HIGHLIGHT[b.state]}"', "penwidth=3"]
            lines.append(f"{indent}{q(b.key)} [{', '.join(attrs)}];")
        if mod:
            lines.append("  }")
    for u, v in edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines)


def render(graph: Any, path: str | os.PathLike | None = None, previous: Any = None, *, next: Any = None,
           depth: int | None = None, max_nodes: int = 250, show_params: bool = False, title: str = "",
           fmt: str | None = None, engine: str = "builtin") -> str:
    """Draw ``graph`` (GraphModule or GraphSnapshot); return the SVG (or DOT) text, and write it to ``path``.

    ``previous``: highlight nodes added or changed since that graph. ``next``: highlight nodes
    that graph removes. ``depth``: collapse modules below this depth (default: only when more
    than ``max_nodes`` boxes would be drawn). ``fmt``: "svg" or "dot" (default: from the path's
    suffix, else svg). ``engine="graphviz"`` lays out with system ``dot`` when installed.
    """
    snap = as_snapshot(graph)
    if fmt is None:
        fmt = "dot" if path is not None and str(path).endswith(".dot") else "svg"
    if fmt not in ("svg", "dot"):
        raise ValueError(f"render: fmt must be 'svg' or 'dot', got {fmt!r}")
    if depth is None:
        depth = _auto_depth(snap, max_nodes, show_params)
    boxes, edges = _boxes(snap, depth, show_params)
    counts = _mark(boxes, snap, previous, next)
    shown = f"{len(boxes)} boxes" + (f", modules collapsed below depth {depth}" if depth is not None else "")
    title = f"{title + ': ' if title else ''}{len(snap)} nodes ({shown})"
    if fmt == "dot":
        text = _dot(boxes, edges, title)
    elif engine == "graphviz":
        if shutil.which("dot") is None:
            raise RuntimeError("engine='graphviz' needs the `dot` program (apt-get install graphviz); "
                               "the default engine='builtin' needs nothing")
        text = subprocess.run(["dot", "-Tsvg"], input=_dot(boxes, edges, title), capture_output=True,
                              text=True, check=True).stdout
    else:
        size = layout(boxes, edges)
        text = _svg(boxes, edges, size, title, counts, groups=depth is None)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text



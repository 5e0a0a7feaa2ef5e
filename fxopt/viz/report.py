"""The HTML report: one self-contained file (inline CSS and SVG, no scripts, no network).

``fxopt.compile(..., report="report.html")`` writes it, and so does
``compiled.fxopt_history.report("report.html")``. It shows

* totals, original vs final: nodes, parameters, model bytes, FLOPs (symbolic and at
  the example sizes), latency on the example inputs, and the user's metric;
* charts: error against the original after each pass, time per pass, parameters per
  top-level module, FLOPs per op family;
* per pass: time, node delta, error, and for each pass that changed the graph the
  before/after graphs with removed, added and changed nodes highlighted, plus the diff;
* the pipeline string that reproduces the run.
"""
from __future__ import annotations

import datetime
import html
import math
from typing import Any

import sympy

from fxopt.viz.graph_diff import diff
from fxopt.viz.graph_render import FAMILY_COLORS, render
from fxopt.ir.snapshot import GraphSnapshot
from fxopt.viz.summarize import fmt_count

__all__ = ["write_report", "report_html"]

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f6f8} td:first-child,th:first-child{text-align:left}
td.text{text-align:left;max-width:520px} .ok{color:#1a7f37} .bad{color:#c0392b;font-weight:bold}
code.pipeline{display:block;background:#f4f6f8;padding:8px;border-radius:4px;font-size:13px;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:18px} .chart{border:1px solid #eee;padding:6px}
details{margin:10px 0;border:1px solid #e3e3e3;border-radius:6px;padding:6px 10px}
summary{cursor:pointer;font-weight:bold} .graphs{display:flex;gap:14px;overflow-x:auto;align-items:flex-start}
.graph{border:1px solid #eee;overflow:auto;max-height:900px;flex:0 0 auto} .muted{color:#777;font-size:12px}
pre.diff{font-size:12px;background:#fafafa;padding:6px;max-height:300px;overflow:auto}
"""


def _num(v: Any, symbols: dict) -> Any:
    """Evaluate a count at the example sizes (ints stay ints)."""
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        e = sympy.sympify(v)
        e = e.subs({sympy.Symbol(k): val for k, val in symbols.items()})
        e = e.subs({s: symbols.get(str(s), s) for s in e.free_symbols})
        return int(e) if e.is_number else None
    except (sympy.SympifyError, TypeError, ValueError):
        return None


def _ratio(a: Any, b: Any) -> str:
    if not a or b is None or a is None:
        return ""
    return f"{b / a:.3f}x"


def _bar_chart(title: str, labels: list[str], series: list[tuple[str, list, str]], log: bool = False,
               unit: str = "") -> str:
    """Horizontal grouped bars as inline SVG."""
    rows = len(labels)
    bar_h, gap, left, width = 12, 8, 170, 250
    group_h = bar_h * len(series) + gap
    height = 40 + rows * group_h + 24
    values = [v for _, vs, _ in series for v in vs if v is not None and (v > 0 or not log)]
    vmax = max(values) if values else 1
    vmin = min((v for v in values if v > 0), default=1e-12)

    def scale(v: float) -> float:
        if v is None or v <= 0:
            return 0.0
        if log:
            lo, hi = math.log10(vmin) - 0.5, math.log10(vmax) + 0.1
            return max(2.0, (math.log10(v) - lo) / (hi - lo) * width)
        return v / vmax * width if vmax else 0.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 110}" height="{height}" '
           f'font-family="Helvetica,Arial,sans-serif" font-size="11">',
           f'<text x="4" y="16" font-weight="bold" font-size="13">{html.escape(title)}</text>']
    for i, label in enumerate(labels):
        y0 = 30 + i * group_h
        text = label if len(label) <= 34 else label[:33] + "…"
        out.append(f'<text x="{left - 6}" y="{y0 + group_h / 2:.0f}" text-anchor="end">{html.escape(text)}</text>')
        for j, (_, vals, color) in enumerate(series):
            v = vals[i]
            w = scale(v) if v is not None else 0
            y = y0 + j * bar_h
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}"/>')
            if v is None:
                shown = "-"
            elif v == 0:
                shown = "0"
            elif log:
                shown = f"{v:.2e}"
            else:
                shown = fmt_count(v) if v >= 1000 else f"{v:.3g}"
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" fill="#444">{html.escape(shown)}{unit}</text>')
    x = left
    for name, _, color in series:
        out.append(f'<rect x="{x}" y="{height - 16}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{x + 14}" y="{height - 7}">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    if log:
        out.append(f'<text x="{left + width + 100}" y="{height - 7}" text-anchor="end" fill="#777">log scale</text>')
        if not any(v for _, vs, _ in series for v in vs if v):
            out.append(f'<text x="{left + 4}" y="{height - 30}" fill="#1a7f37">all zero: every pass was exact</text>')
    out.append("</svg>")
    return "\n".join(out)


def _by_module(snap: GraphSnapshot) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in snap.nodes:
        if n.op == "get_attr":
            key = n.module.split(".")[0] if n.module else "<root>"
            out[key] = out.get(key, 0) + n.params
    return out


def _by_family(snap: GraphSnapshot, symbols: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in snap.nodes:
        v = _num(n.flops, symbols)
        if v:
            out[n.family] = out.get(n.family, 0) + v
    return out


def report_html(history: Any, title: str | None = None) -> str:
    """The report for a :class:`~fxopt.passmgr.manager.History` as an HTML string."""
    h = history
    symbols = dict(h.symbol_values or {})
    capture = h.capture or {}
    title = title or f"fxopt report: {capture.get('model_class', 'model')}"
    s0, s1 = h.initial_stats, h.final_stats
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<div class='muted'>written {datetime.datetime.now().isoformat(timespec='seconds')}; "
             f"capture: {html.escape(str(capture.get('front_end', '?')))} in {capture.get('seconds', 0):.2f} s; "
             f"pipeline: {h.seconds:.2f} s ({h.pass_seconds * 1e3:.1f} ms in passes, "
             f"{h.verify_seconds * 1e3:.1f} ms verifying)</div>",
             "<h2>Reproduce</h2>",
             f"<code class='pipeline'>fxopt.compile(model, args, recipe={html.escape(repr(h.pipeline))})</code>"]

    # ---- totals
    parts.append("<h2>Original vs final</h2><table><tr><th></th><th>original</th><th>final</th><th>final / original</th></tr>")
    rows = [("nodes", s0.get("nodes"), s1.get("nodes"), str),
            ("parameters", s0.get("params"), s1.get("params"), fmt_count),
            ("model bytes", s0.get("model_bytes"), s1.get("model_bytes"), fmt_count)]
    f0, f1 = _num(s0.get("flops"), symbols), _num(s1.get("flops"), symbols)
    sym = ", ".join(f"{k}={v}" for k, v in symbols.items())
    rows.append((f"FLOPs at the example sizes{' (' + sym + ')' if sym else ''}", f0, f1, fmt_count))
    for label, a, b, f in rows:
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(f(a) if a is not None else '-')}</td>"
                     f"<td>{html.escape(f(b) if b is not None else '-')}</td><td>{_ratio(a, b)}</td></tr>")
    if s0.get("flops") is not None and not isinstance(s0.get("flops"), int):
        parts.append(f"<tr><td>FLOPs (symbolic)</td><td>{html.escape(fmt_count(s0.get('flops')))}</td>"
                     f"<td>{html.escape(fmt_count(s1.get('flops')))}</td><td></td></tr>")
    lat = h.latency
    if lat:
        parts.append(f"<tr><td>latency on the example inputs (median of {lat['repeats']})</td>"
                     f"<td>{lat['original_ms']:.3f} ms</td><td>{lat['compiled_ms']:.3f} ms</td>"
                     f"<td>{_ratio(lat['original_ms'], lat['compiled_ms'])}</td></tr>")
    metric = h.metric
    if metric:
        parts.append(f"<tr><td>metric: {html.escape(metric['name'])}</td><td>{metric['original']:.6g}</td>"
                     f"<td>{metric['compiled']:.6g}</td><td>{metric['compiled'] - metric['original']:+.4g} (delta)</td></tr>")
    max_err = max((r.error_vs_original for r in h.records if r.status == "changed"), default=0.0)
    parts.append(f"<tr><td>max |output error| vs original</td><td>0</td><td>{max_err:.3g}</td><td></td></tr>")
    parts.append("</table>")
    if getattr(h, "stages", None):  # fxopt.qat / compile(recover=...): metric and size after each training stage
        from fxopt.viz.stages import describe_stages
        parts.append("<h3>Training stages</h3><pre>" + html.escape(describe_stages(h.stages)) + "</pre>")
    if h.runtime:  # compile(runtime=...): the runtime kept, every candidate's timing and error
        from fxopt.runtime.select import describe
        parts.append("<h3>Runtime</h3><pre>" + html.escape(describe(h.runtime)) + "</pre>")
    if symbols:
        parts.append("<div class='muted'>size symbols: " + html.escape(
            ", ".join(f"{k} = {v}" for k, v in (s0.get("symbols") or {}).items())) + "</div>")

    # ---- charts
    ran = [r for r in h.records if r.status not in ("disabled", "skipped")]
    parts.append("<h2>Charts</h2><div class='charts'>")
    if ran:
        labels = [f"{r.index}. {r.name}" for r in ran]
        parts.append("<div class='chart'>" + _bar_chart(
            "max |error| vs original after each pass", labels,
            [("error", [r.error_vs_original if math.isfinite(r.error_vs_original) else None for r in ran], "#d9534f")],
            log=True) + "</div>")
        parts.append("<div class='chart'>" + _bar_chart(
            "time per pass (ms)", labels,
            [("pass", [r.seconds * 1e3 for r in ran], "#5b8def"),
             ("verify", [r.verify_seconds * 1e3 for r in ran], "#f0ad4e")]) + "</div>")
    if h.initial is not None and h.final is not None:
        m0, m1 = _by_module(h.initial), _by_module(h.final)
        keys = sorted(set(m0) | set(m1), key=lambda k: -max(m0.get(k, 0), m1.get(k, 0)))[:16]
        if keys:
            parts.append("<div class='chart'>" + _bar_chart(
                "parameters per top-level module", keys,
                [("original", [m0.get(k, 0) for k in keys], "#9bb7e0"), ("final", [m1.get(k, 0) for k in keys], "#1f5fbf")])
                + "</div>")
        g0, g1 = _by_family(h.initial, symbols), _by_family(h.final, symbols)
        fams = sorted(set(g0) | set(g1), key=lambda k: -max(g0.get(k, 0), g1.get(k, 0)))
        if fams:
            parts.append("<div class='chart'>" + _bar_chart(
                "FLOPs per op family (at the example sizes)", fams,
                [("original", [g0.get(k, 0) for k in fams], "#c9c9c9"),
                 ("final", [g1.get(k, 0) for k in fams], "#6c8ebf")]) + "</div>")
    parts.append("</div>")

    # ---- per pass
    parts.append("<h2>Passes</h2><table><tr><th>#</th><th>pass</th><th>status</th><th>ms</th><th>verify ms</th>"
                 "<th>nodes</th><th>params</th><th>model bytes</th><th>FLOPs</th><th>error vs previous</th>"
                 "<th>error vs original</th><th>notes</th></tr>")
    for r in h.records:
        cls = "bad" if r.status == "rolled-back" else ("ok" if r.status == "changed" else "")
        delta = f"{r.nodes_after} ({r.nodes_after - r.nodes_before:+d})" if r.changed else str(r.nodes_after)
        notes = r.error or ", ".join(f"{k}={v}" for k, v in r.info.items() if k != "sensitivity")
        parts.append(f"<tr><td>{r.index}</td><td class='text'>{html.escape(r.path)}</td>"
                     f"<td class='{cls}'>{html.escape(r.status)}</td><td>{r.seconds * 1e3:.2f}</td>"
                     f"<td>{r.verify_seconds * 1e3:.2f}</td><td>{delta}</td><td>{fmt_count(r.params)}</td>"
                     f"<td>{fmt_count(r.model_bytes)}</td><td>{html.escape(fmt_count(r.flops))}</td>"
                     f"<td>{_err(r.error_vs_previous, r)}</td><td>{_err(r.error_vs_original, r)}</td>"
                     f"<td class='text'>{html.escape(notes)}</td></tr>")
    parts.append("</table>")
    for r in h.records:  # insert-qdq(budget=...) scored every layer: show the table
        rows = r.info.get("sensitivity") if isinstance(r.info, dict) else None
        if rows:
            kept = set(r.info.get("kept_float", []))
            parts.append(f"<h2>Quantization sensitivity ({html.escape(r.path)})</h2><div class='muted'>Each row "
                         "quantizes one layer alone; worst first. Layers kept in float to meet the budget are "
                         "marked.</div><table><tr><th>layer</th><th>op</th><th>weight</th><th>activation</th>"
                         "<th>cosine</th><th>SQNR dB</th><th>kept float</th></tr>")
            for row in rows:
                parts.append(f"<tr><td class='text'>{html.escape(row['layer'])}</td><td>{html.escape(row['op'])}</td>"
                             f"<td>{html.escape(row['weight'])}</td><td>{html.escape(row['activation'])}</td>"
                             f"<td>{row['cosine']:.5f}</td><td>{row['sqnr']:.2f}</td>"
                             f"<td>{'yes' if row['layer'] in kept else ''}</td></tr>")
            parts.append("</table>")

    changed = [r for r in h.records if r.changed and r.graph_before is not None and r.graph_after is not None]
    parts.append(f"<h2>Graphs before and after each change ({len(changed)})</h2>"
                 "<div class='muted'>Before: nodes the pass removes in red (dashed). After: added nodes in green, "
                 "changed or rewired ones in orange. Hover a node for its details. Large graphs are drawn with "
                 "modules collapsed.</div>")
    for i, r in enumerate(changed):
        d = diff(r.graph_before, r.graph_after)
        before = render(r.graph_before, next=r.graph_after, title="before", max_nodes=160)
        after = render(r.graph_after, previous=r.graph_before, title="after", max_nodes=160)
        parts.append(f"<details {'open' if i == 0 else ''}><summary>{r.index}. {html.escape(r.path)}: "
                     f"{len(d.removed)} removed, {len(d.added)} added, {len(d.rewired)} rewired, "
                     f"{len(d.retyped)} retyped</summary>"
                     f"<pre class='diff'>{html.escape(d.text(limit=40))}</pre>"
                     f"<div class='graphs'><div class='graph'>{before}</div><div class='graph'>{after}</div></div>"
                     "</details>")
    if h.final is not None:
        parts.append("<h2>Final graph</h2><div class='graph'>" +
                     render(h.final, previous=h.initial, title="final", max_nodes=200) + "</div>")
    legend = " ".join(f"<span style='background:{c};padding:1px 6px;border:1px solid #999'>{html.escape(k)}</span>"
                      for k, c in FAMILY_COLORS.items())
    parts.append(f"<p class='muted'>Node colours: {legend}</p>")
    parts.append(f"<h2>Final graph code</h2><pre class='diff'>{html.escape(h.final.code if h.final else '')}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _err(e: float, r: Any) -> str:
    if r.status in ("disabled", "skipped"):
        return "-"
    if math.isinf(e):
        return "inf"
    return "0" if e == 0 else f"{e:.2e}"


def write_report(history: Any, path: str, title: str | None = None) -> str:
    """Write the report for ``history`` to ``path`` and return the path."""
    text = report_html(history, title)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path

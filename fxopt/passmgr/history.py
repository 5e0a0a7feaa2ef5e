"""The record of a pipeline run: one ``PassRecord`` per pass, the graphs before and after, totals.

``print(history)`` shows the per-pass table; ``history.report(path)`` writes the HTML report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fxopt.ir.graph_utils import GraphSnapshot

__all__ = ["PassRecord", "History", "render_table"]


@dataclass
class PassRecord:
    """What one pass did. ``status`` is one of ``changed``, ``unchanged``, ``rolled-back``,
    ``disabled``, ``skipped`` (cut by ``stop_after``)."""

    index: int
    name: str
    step: str                 # the pass as written in a pipeline, with options
    path: str                 # where in the pipeline: "cleanup > repeat#2 > cse"
    status: str
    seconds: float = 0.0      # time inside the pass
    verify_seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    added: int = 0
    removed: int = 0
    params: int = 0
    model_bytes: int = 0
    flops: Any = None         # int or sympy expression of the symbolic dimensions
    error_vs_previous: float = 0.0
    error_vs_original: float = 0.0
    error: str = ""
    info: dict = field(default_factory=dict)
    graph_before: GraphSnapshot | None = None
    graph_after: GraphSnapshot | None = None

    @property
    def changed(self) -> bool:
        return self.status == "changed"


@dataclass
class History:
    """The record of one pipeline run: per-pass records plus the start and end graphs."""

    pipeline: str
    records: list = field(default_factory=list)
    initial: GraphSnapshot | None = None
    final: GraphSnapshot | None = None
    initial_stats: dict = field(default_factory=dict)
    final_stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    # what fxopt.compile adds for the report: how the model was captured, the example sizes of the
    # graph's size symbols, the measured latencies and the user's metric (None when not asked for)
    capture: dict = field(default_factory=dict)
    symbol_values: dict = field(default_factory=dict)
    latency: dict | None = None
    metric: dict | None = None
    # fxopt.compile(runtime=...): the runtime kept, every candidate's timing, error, or why it was refused
    runtime: dict | None = None
    # fxopt.qat and compile(recover=...): one record per training stage ({"stage", "metric", "params",
    # "bytes", "seconds", "epochs": the per-epoch records, ...}), in the order they ran
    stages: list = field(default_factory=list)

    @property
    def failures(self) -> list[PassRecord]:
        return [r for r in self.records if r.status == "rolled-back"]

    @property
    def pass_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def verify_seconds(self) -> float:
        return sum(r.verify_seconds for r in self.records)

    def table(self) -> str:
        """A plain-text table, one row per pass, then totals."""
        head = ["#", "pass", "status", "ms", "verify ms", "nodes", "params", "bytes", "FLOPs", "max err"]
        rows = []
        for r in self.records:
            delta = f"{r.nodes_after} ({r.nodes_after - r.nodes_before:+d})" if r.status == "changed" \
                else str(r.nodes_after or r.nodes_before)
            err = "-" if r.status in ("disabled", "skipped") else _fmt_err(r.error_vs_original)
            rows.append([str(r.index), r.path, r.status + (f": {r.error.splitlines()[0][:60]}" if r.error else ""),
                         f"{r.seconds * 1e3:.1f}", f"{r.verify_seconds * 1e3:.1f}", delta,
                         _fmt_int(r.params), _fmt_int(r.model_bytes), _fmt_flops(r.flops), err])
        s0, s1 = self.initial_stats, self.final_stats
        if s0:
            rows.append(["", "total", f"{len(self.failures)} rolled back", f"{self.pass_seconds * 1e3:.1f}",
                         f"{self.verify_seconds * 1e3:.1f}", f"{s0.get('nodes')} -> {s1.get('nodes')}",
                         f"{_fmt_int(s0.get('params'))} -> {_fmt_int(s1.get('params'))}",
                         f"{_fmt_int(s0.get('model_bytes'))} -> {_fmt_int(s1.get('model_bytes'))}",
                         f"{_fmt_flops(s0.get('flops'))} -> {_fmt_flops(s1.get('flops'))}", ""])
        text = render_table(head, rows) + f"\npipeline: {self.pipeline}"
        for r in self.records:  # which CPU kernels the lowering chose (engine, activation code width)
            if r.status == "changed" and isinstance(r.info, dict) and r.info.get("int8_kernels"):
                text += f"\n{r.name}: int8 kernels {r.info['int8_kernels']} on {r.info.get('cpu', 'this CPU')}"
                timed = r.info.get("engine_ms") or {}
                if timed:
                    text += f" (engines timed on {len(timed)} layers, fastest kept)"
        symbols = self.initial_stats.get("symbols")
        if symbols:
            text += "\nsymbols: " + ", ".join(f"{k} = {v}" for k, v in symbols.items())
        if self.runtime:
            from fxopt.runtime.select import describe
            text += "\n" + describe(self.runtime)
        if self.stages:
            from fxopt.viz.stages import describe_stages
            text += "\n" + describe_stages(self.stages)
        return text

    def __str__(self) -> str:
        return self.table()

    def report(self, path: str, title: str | None = None) -> str:
        """Write the self-contained HTML report of this run to ``path``."""
        from fxopt.viz.report import write_report
        return write_report(self, path, title)


def _fmt_int(v: Any) -> str:
    from fxopt.viz.summarize import fmt_count
    return "-" if v is None else fmt_count(int(v))


def _fmt_flops(v: Any) -> str:
    from fxopt.viz.summarize import fmt_count
    return "-" if v is None else fmt_count(v)


def _fmt_err(e: float) -> str:
    if math.isinf(e):
        return "inf"
    return "0" if e == 0 else f"{e:.2e}"


def render_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


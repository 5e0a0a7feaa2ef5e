"""Instrumentation: hooks around every pass (timing, printing the graph before/after)."""
from __future__ import annotations

import sys
from typing import Iterable, TextIO

import torch.fx as fx

from fxopt.passmgr.history import History, PassRecord, render_table
from fxopt.passmgr.pass_base import Pass, PassContext

__all__ = ["Instrument", "PrintBeforeAfter", "TimingReport"]


class Instrument:
    """Hooks around every pass. Override what you need."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        pass

    def after_failure(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord,
                      error: BaseException) -> None:
        pass

    def on_finish(self, history: History) -> None:
        pass


class PrintBeforeAfter(Instrument):
    """Print the graph code around passes, as a unified diff (``only_changed``: skip no-ops)."""

    def __init__(self, passes: Iterable[str] | None = None, only_changed: bool = True,
                 file: TextIO | None = None):
        self.passes = set(passes) if passes is not None else None
        self.only_changed, self.file = only_changed, file
        self._before = ""

    def before_pass(self, p, gm, ctx):
        self._before = gm.code

    def after_pass(self, p, gm, ctx, record):
        if self.passes is not None and p.name not in self.passes:
            return
        if self.only_changed and not record.changed:
            return
        import difflib
        out = self.file or sys.stderr
        print(f"*** after {record.path} ({record.status}) ***", file=out)
        diff = difflib.unified_diff(self._before.splitlines(), gm.code.splitlines(), "before", "after",
                                    lineterm="", n=1)
        print("\n".join(diff) or "(no textual change)", file=out)


class TimingReport(Instrument):
    """Collect per-pass times; ``report()`` returns them sorted, slowest first."""

    def __init__(self, file: TextIO | None = None, print_at_end: bool = False):
        self.times: list[tuple[str, float, float]] = []
        self.file, self.print_at_end = file, print_at_end

    def after_pass(self, p, gm, ctx, record):
        self.times.append((record.path, record.seconds, record.verify_seconds))

    def after_failure(self, p, gm, ctx, record, error):
        self.after_pass(p, gm, ctx, record)

    def report(self) -> str:
        rows = [[name, f"{s * 1e3:.2f}", f"{v * 1e3:.2f}"] for name, s, v in
                sorted(self.times, key=lambda t: -t[1])]
        return render_table(["pass", "ms", "verify ms"], rows)

    def on_finish(self, history):
        if self.print_at_end:
            print(self.report(), file=self.file or sys.stderr)



"""Instrumentation: hooks around every pass and analysis, as in LLVM's pass instrumentation.

An :class:`Instrument` sees every pass before and after it runs (and on failure), can veto a
pass (``should_run``: LLVM's should-run-optional-pass callbacks; ``disable=`` and
``stop_after=`` are the instruments :class:`Disable` and :class:`StopAfter`), and sees every
analysis computed or served from cache. Built in: :class:`PrintBeforeAfter` (the graph code as
a diff), :class:`TimingReport` (passes and analyses, slowest first), :class:`CrashReproducer`
(MLIR's crash reproducer: the graph before a failing pass, that pass and the inputs, rerun with
``fxopt repro DIR``).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, TextIO

import torch.fx as fx

from fxopt.passmgr.history import History, PassRecord, render_table
from fxopt.passmgr.pass_base import Pass, PassContext

__all__ = ["Instrument", "PrintBeforeAfter", "TimingReport", "Disable", "StopAfter", "CrashReproducer",
           "REPRO_GRAPH", "REPRO_PIPELINE", "REPRO_INPUTS", "REPRO_OPTIONS"]


class Instrument:
    """Hooks around every pass and analysis. Override what you need."""

    def should_run(self, p: Any, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        """None to let ``p`` (a pass, or a recipe alias before it expands) run; a short status
        (``"disabled"``, ``"skipped"``) to skip it: the history records the skip with that status."""
        return None

    def before_analysis(self, name: str, gm: fx.GraphModule, ctx: Any) -> None:
        pass

    def after_analysis(self, name: str, gm: fx.GraphModule, ctx: Any, result: Any, cached: bool,
                       seconds: float) -> None:
        """``cached``: served from the cache (``seconds`` is then 0)."""

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


class Disable(Instrument):
    """Skip the passes (and recipe aliases) with these names (``disable=[...]``)."""

    def __init__(self, names: Iterable[str]):
        self.names = set(names)

    def should_run(self, p, gm, ctx):
        return "disabled" if p.name in self.names else None


class StopAfter(Instrument):
    """Run only the first ``n`` passes, skip the rest (``stop_after=n``; bisect a failing
    pipeline like LLVM's ``-opt-bisect-limit``). Counts the passes that ran."""

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"stop_after must be a non-negative int, got {n!r}")
        self.n, self.count = n, 0

    def should_run(self, p, gm, ctx):
        return "skipped" if isinstance(p, Pass) and self.count >= self.n else None

    def before_pass(self, p, gm, ctx):
        self.count += 1


class TimingReport(Instrument):
    """Collect per-pass times; ``report()`` returns them sorted, slowest first. Analyses that
    were computed (not served from cache) appear as ``analysis:NAME`` in ``analysis_times``
    and in the report."""

    def __init__(self, file: TextIO | None = None, print_at_end: bool = False):
        self.times: list[tuple[str, float, float]] = []
        self.analysis_times: list[tuple[str, float]] = []
        self.file, self.print_at_end = file, print_at_end

    def after_analysis(self, name, gm, ctx, result, cached, seconds):
        if not cached:
            self.analysis_times.append((f"analysis:{name}", seconds))

    def after_pass(self, p, gm, ctx, record):
        self.times.append((record.path, record.seconds, record.verify_seconds))

    def after_failure(self, p, gm, ctx, record, error):
        self.after_pass(p, gm, ctx, record)

    def report(self) -> str:
        rows = [[name, f"{s * 1e3:.2f}", f"{v * 1e3:.2f}"] for name, s, v in
                sorted(self.times + [(n, s, 0.0) for n, s in self.analysis_times], key=lambda t: -t[1])]
        return render_table(["pass", "ms", "verify ms"], rows)

    def on_finish(self, history):
        if self.print_at_end:
            print(self.report(), file=self.file or sys.stderr)




REPRO_GRAPH, REPRO_PIPELINE, REPRO_INPUTS, REPRO_OPTIONS = "graph.fxopt", "pipeline.txt", "inputs.pt", "options.json"


class CrashReproducer(Instrument):
    """When a pass fails (raises, breaks the graph or its outputs, runs past its time limit), write
    into ``directory`` what reruns that failure with one command, ``fxopt repro DIRECTORY``:

    * ``graph.fxopt``: the graph *before* the failing pass (the manager has rolled it back; saved
      with :func:`fxopt.save`, so loading it never runs code);
    * ``pipeline.txt``: the failing pass with its options, in pipeline syntax (MLIR's local
      reproducer: only the pass that failed, on the graph it got);
    * ``inputs.pt``: the example inputs (tensors only; read back with ``weights_only=True``);
    * ``options.json``: the compile options the pass reads that are plain data;
    * ``README.txt``: the error and the command.

    The first failure is kept (``overwrite=True``: the last). Costs nothing until a pass fails:
    the graph written is the manager's rollback. Calibration data is not written; a pass that
    needs it reruns on the example inputs.
    """

    def __init__(self, directory: str | os.PathLike, overwrite: bool = False):
        self.directory = os.fspath(directory)
        self.overwrite = overwrite
        self.written: str | None = None   # the directory, once a reproducer is in it
        self.problems: list[str] = []     # what could not be written

    def after_failure(self, p, gm, ctx, record, error):
        if self.written is not None and not self.overwrite:
            return
        import torch
        from fxopt.archive.serialize import save
        os.makedirs(self.directory, exist_ok=True)
        out = lambda name: os.path.join(self.directory, name)  # noqa: E731
        self.problems = []
        try:
            save(gm, out(REPRO_GRAPH), example_inputs=(tuple(ctx.args), dict(ctx.kwargs)))
        except Exception as e:  # noqa: BLE001 - write what can be written
            self.problems.append(f"the graph could not be saved ({type(e).__name__}: {str(e)[:200]}); "
                                 "graph.py holds its code to read (never run by fxopt)")
            with open(out("graph.py"), "w") as f:
                f.write(gm.code)
        with open(out(REPRO_PIPELINE), "w") as f:
            f.write(str(p) + "\n")
        try:
            torch.save({"args": tuple(ctx.args), "kwargs": dict(ctx.kwargs)}, out(REPRO_INPUTS))
        except Exception as e:  # noqa: BLE001
            self.problems.append(f"the inputs could not be saved ({type(e).__name__}: {str(e)[:200]})")
        options = {}
        for k in getattr(p, "reads_options", ()):
            v = ctx.options.get(k)
            try:
                json.dumps(v)
                options[k] = v
            except TypeError:
                self.problems.append(f"option {k}={type(v).__name__} is not plain data and was not written")
        with open(out(REPRO_OPTIONS), "w") as f:
            json.dump(options, f)
        with open(out("README.txt"), "w") as f:
            f.write(f"fxopt crash reproducer\n\npass: {record.path}\nerror: {record.error}\n\n"
                    f"rerun:\n  fxopt repro {self.directory}\n")
            for line in self.problems:
                f.write(f"\nnote: {line}\n")
        self.written = self.directory

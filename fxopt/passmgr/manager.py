"""The pass manager: runs a pipeline, verifies every pass, rolls back failures, records.

After every pass that reports a change the manager checks, in order:

1. ``graph.lint()`` and that the module recompiles;
2. that no tensor was written in place unless the pass declared ``inplace_weights``
   (version counters, plus a checksum of every tensor's bytes for writes through
   ``.data``; passes that report no change get this check too);
3. that the module still runs on the example inputs and on ``verify_inputs`` (by
   default the first two calibration batches, when there is calibration data);
4. that the outputs keep their structure (the same tree, no ``None`` where a tensor
   was, the same shapes and dtypes);
5. for passes that declare ``preserves_semantics``, that the outputs match the
   previous graph's within the pass's ``tolerance``, on every verification input;
6. optionally (``check_preserved=True``) that every analysis the pass claims to
   preserve equals a fresh computation.

A pass that raises, fails a check or runs past ``pass_timeout`` seconds (default
:data:`DEFAULT_PASS_TIMEOUT`) is rolled back to the graph before it and recorded
with status ``rolled-back`` and the error it introduced; ``strict=True`` raises
:class:`~fxopt.errors.PassError` instead. Problems with the user's data or code are
not pass bugs and are never rolled back: a ``CalibrationError`` and any exception
raised by the user's own calibration iterable or metric propagate. Every pass,
changed or not, gets a :class:`PassRecord` in the :class:`History`.

The model's own state (buffers its ``forward`` writes, such as a step counter) is put
back after every run the manager makes, so verification never advances it and the
returned module holds the state the model had.

Example::

    >>> import torch, fxopt
    >>> gm = fxopt.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity()), torch.randn(2, 4))
    >>> result = fxopt.PassManager("cleanup").run(gm, (torch.randn(2, 4),))
    >>> result.history.records[0].status in ("changed", "unchanged")
    True
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch.fx as fx

from fxopt.passmgr.analysis import AnalysisManager
from fxopt.errors import CalibrationError, PassError, is_user_error
from fxopt.ir.graph_utils import (GraphSnapshot, changed_tensors, max_abs_error, output_structure, param_stats,
                          restore_snapshot, take_snapshot, within_tolerance)
from fxopt.passmgr.timeout import PassTimeout, time_limit
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult
from fxopt.passmgr.pipeline import Pipeline, PipelineAlias, Repeat, as_pipeline
from fxopt.passmgr.history import History, PassRecord
from fxopt.passmgr.instruments import Disable, Instrument, PrintBeforeAfter, StopAfter, TimingReport

__all__ = ["PassManager", "PassRecord", "History", "ManagerResult", "Instrument", "PrintBeforeAfter",
           "TimingReport", "DEFAULT_PASS_TIMEOUT"]  # records and instruments live in history.py / instruments.py

#: seconds one pass may run before the manager stops it (``pass_timeout=None`` waits forever)
DEFAULT_PASS_TIMEOUT = 1800.0


@dataclass
class ManagerResult:
    module: fx.GraphModule
    history: History

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.history.records)


class PassManager:
    """Run a pipeline with verification, rollback, instrumentation and records.

    ``pipeline``: a string (``"cleanup,fold-bn"``), a list of passes, or a Pipeline.
    ``strict``: raise ``PassError`` instead of rolling back. ``verify``: run and
    compare after each changed pass (``False`` only lints). ``stop_after=N``:
    run only the first N passes (bisecting). ``disable``: pass names to skip (both are
    should-run instruments, :class:`~fxopt.passmgr.instruments.StopAfter` and ``Disable``,
    asked before the user's ``instruments``).
    ``check_preserved``: recompute analyses a pass claims to keep and fail it on
    a mismatch. ``record_cost``: FLOPs per record (costs a little time).
    ``pass_timeout``: seconds one pass may run (``None``: no limit).
    """

    def __init__(self, pipeline: Any, *, strict: bool = False, verify: bool = True,
                 stop_after: int | None = None, disable: Iterable[str] = (),
                 instruments: Iterable[Instrument] = (), check_preserved: bool = False,
                 record_cost: bool = True, record_graphs: bool = True, progress: Callable | None = None,
                 warn: bool = True, pass_timeout: float | None = DEFAULT_PASS_TIMEOUT):
        self.pipeline = as_pipeline(pipeline)
        self.strict, self.verify = strict, verify
        if pass_timeout is not None and (isinstance(pass_timeout, bool) or not isinstance(pass_timeout, (int, float))
                                         or not pass_timeout > 0):
            raise ValueError(f"pass_timeout must be a positive number of seconds or None, got {pass_timeout!r}")
        self.pass_timeout = pass_timeout
        if stop_after is not None:
            StopAfter(stop_after)  # validates
        self.stop_after = stop_after
        self.disable = set(disable)
        self.instruments = list(instruments)
        self.check_preserved, self.record_cost, self.record_graphs = check_preserved, record_cost, record_graphs
        self.progress = progress
        self.warn = warn

    # ------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, args: Any = (), kwargs: dict | None = None, *,
            reference: Any = None, calibration: Any = None, options: dict | None = None,
            ctx: PassContext | None = None, verify_inputs: Any = None) -> ManagerResult:
        """Run the pipeline on ``gm`` (mutated in place and returned in the result).

        ``verify_inputs``: more inputs to verify every pass on, a list of input tuples (or
        ``(args, kwargs)`` pairs, or ``fxopt.quant.calibrate.Inputs``); by default the first two
        calibration batches when ``calibration`` is given; ``[]`` for none.
        """
        from fxopt.ir.capture import normalize_inputs
        args, kwargs = normalize_inputs(args, kwargs)
        # per run: the should-run instruments for disable/stop_after (fresh counts), then the user's
        self._instruments = ([Disable(self.disable)] if self.disable else []) + \
            ([StopAfter(self.stop_after)] if self.stop_after is not None else []) + self.instruments
        self._analyses = AnalysisManager(instruments=self._instruments)
        self._ctx = ctx or PassContext(args, kwargs, analyses=self._analyses, calibration=calibration,
                                       options=options)
        self._ctx.analyses = self._analyses
        self._ctx.verify_inputs = _verification_inputs(verify_inputs, self._ctx)
        self._index = 0
        self._snap = None
        start = time.perf_counter()
        self._prev_outs = self._run_all(gm) if self.verify else None
        self._prev_out = self._prev_outs[0] if self._prev_outs else None
        self._reference = reference if reference is not None else self._prev_out
        self.history = History(str(self.pipeline))
        self.history.initial_stats = self._stats(gm)  # first: the snapshot picks up per-node costs
        self._snapshot = GraphSnapshot.of(gm, self._costs) if self.record_graphs else None
        self.history.initial = self._snapshot
        self._run_pipeline(self.pipeline, gm, "")
        self.history.final = self._snapshot if self.record_graphs else None
        self.history.final_stats = self._stats(gm)
        self.history.seconds = time.perf_counter() - start
        for inst in self._instruments:
            inst.on_finish(self.history)
        return ManagerResult(gm, self.history)

    def _stats(self, gm: fx.GraphModule) -> dict:
        params, nbytes = param_stats(gm)
        out = {"nodes": len(gm.graph.nodes), "params": params, "model_bytes": nbytes, "flops": None}
        self._costs = None   # per-node costs for the snapshot taken next
        if self.record_cost:
            try:
                cost = self._ctx.analysis("cost", gm)
                out["flops"], out["symbols"] = cost.total_flops, cost.symbols
                self._costs = cost.per_node
            except Exception:  # cost is informative; never fail a run over it
                out["flops"] = None
        return out

    # ------------------------------------------------------------------
    def _run_pipeline(self, pipeline: Pipeline, gm: fx.GraphModule, path: str) -> bool:
        changed = False
        for step in pipeline:
            changed |= self._run_step(step, gm, path)
        return changed

    def _run_step(self, step: Any, gm: fx.GraphModule, path: str) -> bool:
        join = (lambda name: f"{path} > {name}" if path else name)  # noqa: E731
        if isinstance(step, Pipeline):
            return self._run_pipeline(step, gm, path)
        if isinstance(step, Repeat):
            any_change = False
            for round_ in range(1, step.max + 1):
                if not self._run_pipeline(step.inner, gm, join(f"repeat#{round_}")):
                    break
                any_change = True
            return any_change
        if isinstance(step, PipelineAlias):
            status = self._should_run(step, gm)
            if status:
                self._record_skip(step, join(step.name), status)
                return False
            return self._run_pipeline(step.expand(), gm, join(step.name))
        if isinstance(step, Pass):
            return self._run_pass(step, gm, join(step.name))
        raise TypeError(f"unexpected pipeline step {step!r}")

    def _should_run(self, p: Any, gm: fx.GraphModule) -> str | None:
        """The first skip status an instrument gives for ``p``, or None to run it."""
        for inst in self._instruments:
            ask = getattr(inst, "should_run", None)   # instruments written before should_run existed
            status = ask(p, gm, self._ctx) if ask is not None else None
            if status:
                return str(status)
        return None

    def _record_skip(self, p: Pass, path: str, status: str) -> None:
        self._index += 1
        n = self._snapshot_nodes()
        record = PassRecord(self._index, p.name, str(p), path, status, nodes_before=n, nodes_after=n)
        self._fill_stats_from_previous(record)
        self.history.records.append(record)

    def _snapshot_nodes(self) -> int:
        if self.history.records:
            return self.history.records[-1].nodes_after
        return self.history.initial_stats.get("nodes", 0)

    def _run_pass(self, p: Pass, gm: fx.GraphModule, path: str) -> bool:
        status = self._should_run(p, gm)
        if status:
            self._record_skip(p, path, status)
            return False
        self._index += 1
        ctx = self._ctx
        record = PassRecord(self._index, p.name, str(p), path, "unchanged", nodes_before=len(gm.graph.nodes))
        if self.progress is not None:
            self.progress(record)
        for inst in self._instruments:
            inst.before_pass(p, gm, ctx)
        before_ids = {id(n) for n in gm.graph.nodes}
        snap = self._rollback_point(gm, p)
        t0 = time.perf_counter()
        try:
            with time_limit(self.pass_timeout):
                result = p.run(gm, ctx)
            if isinstance(result, bool):
                result = PassResult(result)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}; return a PassResult or a bool")
        except PassTimeout as e:
            record.seconds = time.perf_counter() - t0
            return self._fail(p, gm, snap, record, f"ran past its time limit of {self.pass_timeout:g} s and was "
                              "stopped (compile(..., pass_timeout=SECONDS) sets the limit; None waits forever)", e)
        except Exception as e:  # noqa: BLE001 - a failing pass is rolled back and reported
            record.seconds = time.perf_counter() - t0
            if isinstance(e, CalibrationError) or is_user_error(e):
                restore_snapshot(gm, snap)  # the user's data or code failed, not the pass: say so, don't hide it
                self._snap = None
                raise
            return self._fail(p, gm, snap, record, f"raised {type(e).__name__}: {e}", e)
        record.seconds = time.perf_counter() - t0
        record.info = dict(result.info)
        if not result.changed:
            dirty = changed_tensors(snap)
            if dirty and not p.inplace_weights:
                return self._fail(p, gm, snap, record, "reported no change but wrote tensors in place: "
                                  f"{', '.join(dirty[:5])}", None)
            record.nodes_after = len(gm.graph.nodes)
            record.error_vs_original = self.history.records[-1].error_vs_original if self.history.records else 0.0
            self._fill_stats_from_previous(record)
            self.history.records.append(record)
            for inst in self._instruments:
                inst.after_pass(p, gm, ctx, record)
            return False

        t1 = time.perf_counter()
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as e:  # noqa: BLE001
            return self._fail(p, gm, snap, record, f"left an invalid graph: {e}", e)
        dirty = changed_tensors(snap)
        if dirty and not p.inplace_weights:
            # cannot be rolled back: the old values are gone
            restore_snapshot(gm, snap)
            self._snap = None
            raise PassError(p.name, f"wrote tensors in place without declaring it: {', '.join(dirty[:5])}; "
                                    "the graph was restored but those tensors keep the new values",
                            remedy="set `inplace_weights = True` on the pass, or assign new tensors "
                                   "instead of writing into existing ones")
        if self.verify:
            try:
                outs = self._run_all(gm)
            except Exception as e:  # noqa: BLE001
                return self._fail(p, gm, snap, record, f"the module no longer runs on the "
                                  f"{'example' if self._failed_at == 0 else 'verification'} inputs: "
                                  f"{type(e).__name__}: {e}", e)
            broken = _structure_change(outs[0], self._prev_out)
            if broken:
                return self._fail(p, gm, snap, record, f"changed the structure of the outputs: {broken}", None)
            if p.preserves_semantics:
                tol = p.tolerance
                record.error_vs_previous = 0.0
                for i, (out, prev) in enumerate(zip(outs, self._prev_outs)):
                    ok, err = within_tolerance(out, prev, tol.atol, tol.rtol)
                    record.error_vs_previous = max(record.error_vs_previous, err)
                    if not ok:
                        where = "" if i == 0 else f" on verification input {i}"
                        return self._fail(p, gm, snap, record,
                                          f"changed the outputs by up to {err:.3g}{where} (tolerance "
                                          f"atol={tol.atol:g}, rtol={tol.rtol:g})", None)
            else:
                record.error_vs_previous = max(max_abs_error(o, q) for o, q in zip(outs, self._prev_outs))
            record.error_vs_original = max_abs_error(outs[0], self._reference)
            self._prev_outs, self._prev_out = outs, outs[0]
        if self.check_preserved:
            stale = self._check_preserved(result, gm)
            if stale:
                return self._fail(p, gm, snap, record, "claimed to preserve analyses it changed: "
                                  f"{', '.join(stale)}", None)
        record.verify_seconds = time.perf_counter() - t1
        # provenance: stamp the nodes this pass created
        added = 0
        for n in gm.graph.nodes:
            if id(n) not in before_ids:
                n.meta["fxopt_created_by"] = p.name
                added += 1
        record.added = added
        record.removed = record.nodes_before + added - len(gm.graph.nodes)
        record.nodes_after = len(gm.graph.nodes)
        record.status = "changed"
        self._snap = None
        self._analyses.invalidate(result)
        stats = self._stats(gm)
        record.params, record.model_bytes, record.flops = stats["params"], stats["model_bytes"], stats["flops"]
        if self.record_graphs:
            record.graph_before = self._snapshot
            self._snapshot = GraphSnapshot.of(gm, self._costs)
            record.graph_after = self._snapshot
        self.history.records.append(record)
        for inst in self._instruments:
            inst.after_pass(p, gm, ctx, record)
        return True

    def _run_all(self, gm: fx.GraphModule) -> list:
        """Outputs on the example inputs, then on each verification input (state preserved)."""
        outs = []
        self._failed_at = 0
        for i, (args, kwargs) in enumerate([(self._ctx.args, self._ctx.kwargs)] + list(self._ctx.verify_inputs)):
            self._failed_at = i
            outs.append(self._ctx.run(gm, args, kwargs))
        return outs

    def _rollback_point(self, gm: fx.GraphModule, p: Pass) -> Any:
        """The state to roll back to. Passes that change nothing leave it valid, so a
        snapshot is taken only after changes (cheap fixed-point loops on big graphs)."""
        if self._snap is None or (p.inplace_weights and not self._snap.clones):
            self._snap = take_snapshot(gm, deep=p.inplace_weights)
        return self._snap

    def _check_preserved(self, result: PassResult, gm: fx.GraphModule) -> list[str]:
        return self._analyses.check(gm, self._ctx, result)

    def _fill_stats_from_previous(self, record: PassRecord) -> None:
        prev = next((r for r in reversed(self.history.records) if r.status in ("changed", "unchanged",
                                                                               "rolled-back")), None)
        src = prev.__dict__ if prev else self.history.initial_stats
        record.params = src.get("params", 0)
        record.model_bytes = src.get("model_bytes", 0)
        record.flops = src.get("flops")

    def _fail(self, p: Pass, gm: fx.GraphModule, snap: Any, record: PassRecord, reason: str,
              cause: BaseException | None) -> bool:
        restore_snapshot(gm, snap)
        if snap.clones:  # restored tensors now hold the clones: copy again next time
            self._snap = None
        if self.verify and not snap.clones and self._prev_out is not None:
            # writes through ``.data`` bypass the version counters: make sure the rollback really
            # restored the model before going on
            try:
                again = self._ctx.run(gm)
            except PassTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                again, reason = None, f"{reason}; and the restored module no longer runs ({e})"
            # (a PassTimeout here would be the watchdog's late shot: the pass itself was already stopped)
            if again is None or not within_tolerance(again, self._prev_out, 0.0, 0.0)[0]:
                raise PassError(p.name, f"{reason}; rolling back did not restore the outputs, so the pass "
                                        "wrote into tensors in place (for example through .data)",
                                remedy="set `inplace_weights = True` on the pass so the manager copies "
                                       "tensors before running it") from cause
        self._analyses.invalidate()
        record.status = "rolled-back"
        record.error = reason
        record.nodes_after = len(gm.graph.nodes)
        record.error_vs_original = self.history.records[-1].error_vs_original if self.history.records else 0.0
        self._fill_stats_from_previous(record)
        self.history.records.append(record)
        err = PassError(p.name, reason, remedy="disable it with disable=['%s'] or fix the pass" % p.name)
        for inst in self._instruments:
            inst.after_failure(p, gm, self._ctx, record, err)
        if self.strict:
            raise err from cause
        if self.warn:
            import warnings
            warnings.warn(f"fxopt: pass '{p.name}' was rolled back: {reason}", stacklevel=5)
        return False


def _structure_change(new: Any, old: Any) -> str:
    """How ``new`` outputs differ from ``old`` ones in what a caller relies on ('' when they do not)."""
    if old is None:
        return ""
    a, b = output_structure(new), output_structure(old)
    if a == b:
        return ""
    if a[0] != b[0]:
        return f"the model returned {_short(new)} instead of {_short(old)}"
    for i, (x, y) in enumerate(zip(a[1], b[1])):
        if x != y:
            return f"output {i} is {_leaf(x)}, was {_leaf(y)}"
    return "the outputs differ"


def _leaf(v: Any) -> str:
    if isinstance(v, tuple):
        return f"a {v[1]} tensor of shape {list(v[0])}".replace("torch.", "")
    return "None" if v == "NoneType" else f"a {v}"


def _short(out: Any) -> str:
    text = type(out).__name__ if not isinstance(out, (tuple, list, dict)) else repr(
        __import__("torch").utils._pytree.tree_map(lambda t: "T", out))
    return text if len(text) < 80 else text[:77] + "..."


def _verification_inputs(given: Any, ctx: PassContext) -> list:
    """``verify_inputs=`` as (args, kwargs) pairs; by default two calibration batches."""
    from fxopt.quant.calibrate import iter_calibration, normalize_item
    if given is None:
        if ctx.calibration is None:
            return []
        try:
            return [(a, k) for _, a, k in iter_calibration(
                ctx.calibration, inputs=ctx.options.get("calibration_inputs"), example=(ctx.args, ctx.kwargs),
                max_batches=2, progress=False)]
        except CalibrationError:
            return []  # the pass that calibrates reports bad data, with its own message
    if not isinstance(given, (list, tuple)):
        raise ValueError(f"verify_inputs must be a list of model inputs, got {type(given).__name__}")
    out = []
    for item in given:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
            out.append(item)
        else:
            out.append(normalize_item(item))
    return out

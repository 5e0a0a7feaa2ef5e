"""``fxopt.compile``: one call from a model to an optimized module with its history."""
from __future__ import annotations

import copy
import weakref
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from fxopt.ir.capture import _check_finite, check_materialized, normalize_inputs, trace
from fxopt.errors import InputError, PipelineError, RecipeError
from fxopt.passmgr.manager import DEFAULT_PASS_TIMEOUT, History, Instrument, PassManager
from fxopt.passmgr.pipeline import Pipeline, as_pipeline
from fxopt.passmgr.recipes import recipes
from fxopt.ir.torch_compat import torch_internals

__all__ = ["compile", "resolve_recipe"]


def resolve_recipe(recipe: Any) -> Pipeline:
    """A recipe name, a pipeline string, a list of passes or a Pipeline -> Pipeline."""
    if isinstance(recipe, str):
        if recipe in recipes:
            return as_pipeline(recipes[recipe].pipeline)
        try:
            return as_pipeline(recipe)
        except PipelineError as e:
            first = str(e).splitlines()[0]
            from fxopt.passmgr.pass_base import PASS_REGISTRY
            import re
            names = set(re.findall(r"(?:^|[,>])\s*([a-z][a-z0-9:-]*)\s*(?=\(|,|$)", recipe.strip()))
            if names and all(n in PASS_REGISTRY or n in recipes or n == "repeat" for n in names):
                raise RecipeError(str(e)) from e  # a pipeline of known passes with a bad option: say just that
            raise RecipeError(f"unknown recipe '{recipe}'. Known recipes: {', '.join(recipes)} "
                              f"(`fxopt recipes` lists them); read as a pipeline string it fails too: "
                              f"{first}") from e
    try:
        return as_pipeline(recipe)
    except PipelineError as e:
        raise RecipeError(str(e)) from e


def compile(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None, recipe: Any = "default",
            calibration: Iterable | None = None, *, dynamic: Any = None, strict: bool = False,
            verify: bool = True, disable: Iterable[str] = (), stop_after: int | None = None,
            instruments: Iterable[Instrument] = (), report: str | None = None,
            progress: bool | None = None, metric: Callable[[torch.nn.Module], float] | None = None,
            latency_repeats: int = 10, verify_inputs: Any = None,
            pass_timeout: float | None = DEFAULT_PASS_TIMEOUT, reproducer: str | None = None,
            runtime: str = "torch", runtime_candidates: Iterable[str] | None = None,
            recover: dict | None = None, **options: Any) -> fx.GraphModule:
    """Capture ``model``, run ``recipe`` over it, and return the optimized module.

    The result is called exactly like ``model`` (same positional and keyword
    inputs, same output structure). ``model`` itself is never modified: fxopt
    works on a deep copy in eval mode. ``result.fxopt_history`` holds the
    per-pass records and the graphs before and after; ``print(result.fxopt_history)``
    shows them.

    ``recipe``: a name from ``fxopt.recipes``, a pipeline string
    (``"cleanup,fold-bn"``), or a list of passes. ``dynamic``: see
    :func:`fxopt.trace` (default: the batch dimension symbolic, and the sequence dimension
    of token inputs such as ``input_ids``). ``strict``: raise
    ``PassError`` when a pass fails instead of rolling it back. ``disable`` and
    ``stop_after`` bisect a pipeline. ``reproducer``: a directory where the first failing pass
    leaves a crash reproducer (the graph before it, the pass, the inputs), rerun with
    ``fxopt repro DIR`` or :func:`fxopt.passmgr.repro.rerun`. ``progress``: a progress bar on stderr
    (default: when stderr is a terminal). ``report``: write the HTML report
    there (also ``result.fxopt_history.report(path)``); latency on the example
    inputs is measured for it (median of ``latency_repeats``). ``metric``: a
    function of a module returning a number (accuracy, say), evaluated on the
    original and the result and shown in the report. ``verify_inputs``: more inputs
    (a list of input tuples) every pass is verified on; by default the first two
    calibration batches. ``pass_timeout``: seconds a pass may run before it is stopped,
    rolled back and named (default 1800; ``None``: no limit).

    ``runtime``: what runs the optimized graph. ``"torch"`` (the default): fxopt's graph on eager
    PyTorch with fxopt's CPU kernels. ``"onnxruntime"``, ``"openvino"``: the graph exported to ONNX
    (:func:`fxopt.export_onnx`) and run by that runtime; ``"inductor"``: ``torch.compile`` of the graph.
    ``"auto"``: each installed runtime (``runtime_candidates=``, default torch, onnxruntime, openvino)
    is built, checked against fxopt's graph on the example and verification inputs, and timed on the
    example inputs; the fastest that agrees is kept. A runtime other than torch comes back as a
    :class:`fxopt.RuntimeModule`, called exactly like the model; ``history.runtime`` has the decision
    (every candidate's milliseconds, error and why it was refused). A named runtime that is missing or
    disagrees raises :class:`~fxopt.errors.RuntimeUnavailable`.

    ``recover``: win back the accuracy the recipe costs, in the same call: ``{"data": batches,
    "epochs": 3, "distill": True, "qat": True}`` fine-tunes the compressed model distilled from
    ``model``, then trains the recipe's quantization (QAT) before lowering; ``metric`` is measured
    after every stage and the history's ``stages`` lists them (:mod:`fxopt.train.recover`).

    Bad calibration data (empty, NaN/Inf, wrong shapes) raises ``CalibrationError``,
    strict or not, and an exception raised by your own data loader or metric reaches
    you unchanged: these are not pass bugs, and rolling the pass back would hand you
    a float model for a quantization recipe without saying why. A one-shot iterator
    (a generator) is read once into a list, since several passes use the data.
    A recipe whose compressing passes change nothing (no layer they can handle) warns.

    Other keyword options
    reach passes as ``ctx.options`` (``smoothquant=``, ``group_size=``,
    ``calibration_inputs=``, ``calibration_batches=``, ``budget_metric=``,
    ``max_metric_drop=`` for the quantization and pruning passes); an option no
    built-in pass of the pipeline reads gets a warning (a typo, or the wrong recipe).

    Example::

        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.ReLU())
        >>> fast = fxopt.compile(model, (torch.randn(4, 8),))
        >>> fast(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxopt.compile expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(args, kwargs)
    if not args and not kwargs:
        raise InputError("fxopt.compile needs example inputs: compile(model, (x,)) or "
                         "compile(model, kwargs={'input_ids': ids}); they fix dtypes and ranks and "
                         "are used to verify every pass")
    _check_finite(args, kwargs)
    if recover is not None:
        if runtime != "torch" or runtime_candidates is not None:
            raise InputError("recover= runs on the torch runtime; compile its result again with "
                             "recipe='cleanup', runtime=... to hand it to another runtime")
        from fxopt.train.recover import compile_and_recover
        out = compile_and_recover(model, args, kwargs, recipe, recover, metric,
                                  {"calibration": calibration, "progress": progress, "strict": strict,
                                   "verify": verify, "pass_timeout": pass_timeout, "dynamic": dynamic, **options})
        if report is not None:
            _write_report(out, report)
        return out
    pipeline = resolve_recipe(recipe)
    _check_options(pipeline, options)
    # options that change what a pass does become part of its printed config: the history's pipeline
    # reproduces the run without them
    from fxopt.passmgr.pipeline import fold_options
    # (the runtime too: insert-qdq shapes residual adds for the runtime that will run the graph)
    pipeline = fold_options(pipeline, {**options, "runtime": runtime, "runtime_candidates": runtime_candidates})
    if calibration is not None and (not hasattr(calibration, "__iter__") or isinstance(calibration, (str, bytes))):
        raise InputError(f"calibration must be an iterable of model inputs, got {type(calibration).__name__}")
    if calibration is not None and not isinstance(calibration, torch.Tensor) and iter(calibration) is calibration:
        import itertools
        cap = options.get("calibration_batches")
        calibration = list(itertools.islice(calibration, int(cap) if cap else None))  # one-shot: read it once
    try:
        with torch_internals():
            work = copy.deepcopy(model)
    except Exception as e:
        raise InputError(f"cannot copy the model ({type(e).__name__}: {e}); fxopt works on a copy so that "
                         "your model is never changed; make it deep-copyable") from e
    check_materialized(work)  # meta-device weights: say how to materialize them, not "does not run"
    work.eval()
    state = _buffers(work)  # a model that updates buffers in forward: every run here is undone
    with torch.no_grad():
        try:
            reference = work(*args, **kwargs)
        except Exception as e:
            raise InputError(f"the model does not run on the example inputs: {type(e).__name__}: {e}") from e
        finally:
            _restore(state)
    for leaf in torch.utils._pytree.tree_leaves(reference):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise InputError("the model produces NaN or Inf on the example inputs; fxopt cannot verify passes "
                             "against such outputs: check the weights and the inputs")
    import sys

    from tqdm.auto import tqdm
    from fxopt.viz.timing import median_ms
    measured: dict = {}
    if report is not None:
        measured["original_ms"] = median_ms(lambda: work(*args, **kwargs), latency_repeats)
        _restore(state)
    if metric is not None:
        measured["metric_original"] = _run_metric(metric, work)
        _restore(state)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(desc="fxopt: capture", unit=" pass", disable=not show, leave=False)
    try:
        gm = trace(work, args, kwargs, dynamic=dynamic, copy_model=False)
        bar.set_description(f"fxopt: {pipeline}"[:60])

        def tick(record: Any) -> None:
            bar.set_postfix_str(record.path, refresh=False)
            bar.update(1)
        if reproducer is not None:
            from fxopt.passmgr.instruments import CrashReproducer
            instruments = [*instruments, CrashReproducer(reproducer)]
        pm = PassManager(pipeline, strict=strict, verify=verify, disable=disable, stop_after=stop_after,
                         instruments=instruments, warn=False, progress=tick, pass_timeout=pass_timeout)
        result = pm.run(gm, args, kwargs, reference=reference, calibration=calibration, options=options,
                        verify_inputs=verify_inputs)
    finally:
        bar.close()
    out = result.module
    history: History = result.history
    history.capture = gm.meta.get("fxopt_capture", {})
    history.symbol_values = _symbol_values(out)
    from fxopt.ir.graph_utils import preserved_state
    if "original_ms" in measured:
        with preserved_state(out):
            compiled_ms = median_ms(lambda: out(*args, **kwargs), latency_repeats)
        history.latency = {"original_ms": measured["original_ms"], "repeats": latency_repeats,
                           "compiled_ms": compiled_ms}
    if metric is not None:
        name = getattr(metric, "__name__", "metric")
        with preserved_state(out):
            compiled = _run_metric(metric, out)
        history.metric = {"name": "metric" if name == "<lambda>" else name,
                          "original": measured["metric_original"], "compiled": compiled}
    out.fxopt_history = history
    out.meta["fxopt_history"] = history
    # the uncompressed model, the default teacher of fxopt.finetune(out, distill=...): a weak reference, so the
    # result holds no second copy of the weights; a compiled model passes on the model it came from
    from fxopt.train.distill import source_of
    source = source_of(model)
    out.meta["fxopt_source"] = weakref.ref(source if source is not None else model)  # meta survives deepcopy
    if history.failures:
        names = ", ".join(f"{r.name} ({r.error.splitlines()[0][:80]})" for r in history.failures)
        warnings.warn(f"fxopt.compile: {len(history.failures)} pass(es) rolled back: {names}", stacklevel=2)
    idle = _idle_compressions(pipeline, history)
    if idle:
        warnings.warn(f"fxopt.compile: recipe '{recipe if isinstance(recipe, str) else pipeline}' changed nothing "
                      f"in {'; '.join(idle)}: the model is not compressed as the recipe says", stacklevel=2)
    if runtime != "torch" or runtime_candidates is not None:
        from fxopt.runtime.select import choose_runtime, warn_if_slower
        extra = list(verify_inputs or []) or (list(calibration)[:2] if isinstance(calibration, list) else [])
        with preserved_state(out):
            handed, record = choose_runtime(out, args, kwargs, runtime, candidates=runtime_candidates,
                                            verify_inputs=extra, original=work, reference=reference,
                                            repeats=latency_repeats)
        _restore(state)
        history.runtime = record
        warn_if_slower(record)
        if handed is not out:
            out = handed
    elif history.latency and history.latency["compiled_ms"] > 1.05 * history.latency["original_ms"]:
        warnings.warn(f"fxopt.compile: the compiled model runs slower than the original on the example inputs "
                      f"({history.latency['compiled_ms']:.3g} ms vs {history.latency['original_ms']:.3g} ms); "
                      "try runtime='auto' or another recipe", RuntimeWarning, stacklevel=2)
    if report is not None:
        _write_report(out, report)
    return out


def _buffers(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore(state: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, saved in state:
            if b.shape == saved.shape and not torch.equal(b, saved):
                b.copy_(saved)


def _idle_compressions(pipeline: Pipeline, history: History) -> list[str]:
    """Passes that exist to compress the model (``Pass.compresses``) but changed nothing, with why."""
    from fxopt.passmgr.pipeline import passes_of
    compressing = {p.name for p in passes_of(pipeline) if getattr(p, "compresses", False)}
    out = []
    for r in history.records:
        if r.name in compressing and r.status == "unchanged":
            why = r.info.get("why") if isinstance(r.info, dict) else None
            out.append(f"{r.name} ({why})" if why else r.name)
    return out


def _check_options(pipeline: Pipeline, options: dict) -> None:
    """Warn about keyword options no pass of the pipeline reads (a typo, or the wrong recipe)."""
    if not options:
        return
    from fxopt.passmgr.pipeline import passes_of
    steps = passes_of(pipeline)
    known = {o for p in steps for o in getattr(p, "reads_options", ())}
    declared_all = all(type(p).__module__.startswith(("fxopt.", "passes.")) for p in steps)
    for p in steps:
        check = getattr(p, "check_options", None)
        if check is not None:
            check(options)
    unknown = sorted(set(options) - known - {"progress"})
    if unknown and declared_all:
        warnings.warn(f"fxopt.compile: option(s) {', '.join(unknown)} are not read by any pass of '{pipeline}'"
                      + (f" (they read: {', '.join(sorted(known))})" if known else " (it reads no options)"),
                      stacklevel=3)


def _write_report(out: Any, path: str) -> None:
    from fxopt.viz.report import write_report
    write_report(out.fxopt_history, path)


def _run_metric(metric: Callable, module: torch.nn.Module) -> float:
    from fxopt.train.recover import run_metric
    return run_metric(metric, module)


def _symbol_values(gm: fx.GraphModule) -> dict:
    """Example value of every size symbol (its hint), e.g. {'s77': 8}."""
    out = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol and s.node.hint is not None:
                    out[str(s.node.expr)] = int(s.node.hint)
    return out

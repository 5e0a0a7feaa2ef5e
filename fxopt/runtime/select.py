"""``runtime=`` of :func:`fxopt.compile`: hand the optimized graph to a runtime, check it, keep the fastest.

For every candidate runtime the graph is built (exported to ONNX once, shared by ONNX Runtime and
OpenVINO), run on the example inputs and the verification inputs, and compared with fxopt's own graph.
Float32 graphs must agree to ``1e-4`` of the output's magnitude. A quantized graph amplifies last-bit
differences: a runtime whose float parts (GELU, softmax, layer norm) differ in the last bit moves an
activation code by one here and there, and attention spreads the move over every token and layer
(measured on the MiniLM BERT, dynamic int8, 8x128: the first layer agrees to 2e-7, the last hidden
state to 0.05 of its magnitude, against 0.9 for the quantization itself; fxopt's own lowered kernels
differ from its simulation just as much). So a quantized graph's runtime must (1) be as accurate as
fxopt's graph: its error against the float model within 1.1x fxopt's (worst and median element, plus
``1e-4``), and (2) stay near fxopt's graph: the worst element within half the quantization error
(at least ``1e-2``), the median within the quantization's median (at least ``1e-4``). A bf16/fp16 graph
is judged the same way with the bounds of :data:`LOW_PRECISION_RULE` (each implementation rounds bf16 on
its own: 1.5x fxopt's error against the float model, twice its error from fxopt's graph). Exactness of
each translated layer is what the tests check, on single layers, to 1e-6. A runtime outside the bounds
is refused, with the error. Then each runtime that agrees is timed on the example inputs, with the
original model (medians over up to ``repeats`` rounds after two warm-up calls, round-robin: in each round
each candidate gets one untimed call and two timed ones, so that drift hits every candidate alike and
none is charged for the switch from the one before; worker threads do not spin, see
:mod:`fxopt.runtime.engines`) and the fastest is kept.
``history.runtime`` holds the decision: every candidate with its milliseconds, its errors, and why it
was refused.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import InputError, RuntimeUnavailable
from fxopt.runtime.engines import RUNTIMES, Built, RuntimeModule, build_runtime, get_runtime

__all__ = ["choose_runtime", "AUTO_CANDIDATES", "FLOAT_TOLERANCE", "QUANT_TOLERANCE", "QUANT_RULE",
           "LOW_PRECISION_RULE", "agreement", "tolerance_floor"]

#: what ``runtime="auto"`` tries, in order, when installed; Inductor only when named in
#: ``runtime_candidates=``: its cold compile takes tens of seconds to minutes on a 2-core CPU
AUTO_CANDIDATES = ("torch", "onnxruntime", "openvino")
FLOAT_TOLERANCE = 1e-4
QUANT_TOLERANCE = 1e-2
#: a bf16/fp16 graph (the ``cast`` pass): (accuracy margin against the float model, worst and median distance
#: from fxopt's graph in units of fxopt's own error). Unlike a quantized graph, whose codes two faithful
#: implementations share, each bf16 implementation rounds on its own (accumulation order, which elementwise
#: ops it keeps wider), so two of them lie about sqrt(2) times either's error apart. ``python bench/cpu.py
#: --models minilm --rows "fxopt bf16"`` prints the figures (AVX-512 BF16 EPYC): against the float model
#: fxopt's bf16 graph 0.017 of the output, OpenVINO 0.013; the two 0.024 apart (1.4x fxopt's error). The
#: graph itself changes from process to process (``cast`` keeps a layer in float32 where it timed slower).
#: A runtime computing something else lies outside (tests: a stand-in with outputs 5% off is refused).
LOW_PRECISION_RULE = (1.5, 2.0, 2.0)
#: the same bounds for a quantized graph (see the module docstring)
QUANT_RULE = (1.1, 0.5, 1.0)


def tolerance_floor(gm: fx.GraphModule) -> float:
    """The least worst-case distance (relative to the output magnitude) a runtime of ``gm`` is allowed from
    fxopt's graph: integer rounding for a quantized or cast graph, float rounding otherwise.
    :func:`choose_runtime` widens it by the graph's own error where it knows the float model's outputs."""
    return QUANT_TOLERANCE if _is_quantized(gm) or _is_low_precision(gm) else FLOAT_TOLERANCE


def _is_quantized(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "fxopt"
               and "csr" not in str(n.target) for n in gm.graph.nodes)


_LOW = (torch.bfloat16, torch.float16)


def _is_low_precision(gm: fx.GraphModule) -> bool:
    """Does the graph compute in bf16/fp16: a value, a weight or a cast of that dtype (the ``cast`` pass's
    graphs, including those whose only casts go back to float32, as an embedding stored in bf16 feeding
    bf16 layers)?"""
    from fxopt.ir.rewrite_utils import attr_tensor
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype in _LOW:
            return True
        if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default and n.kwargs.get("dtype") in _LOW:
            return True
        if n.op == "get_attr":
            try:
                t = attr_tensor(gm, n)
            except AttributeError:
                t = None
            if isinstance(t, torch.Tensor) and t.dtype in _LOW:
                return True
    return False


def agreement(ref: Any, out: Any) -> tuple[float, float]:
    """(max, median) of |out - ref| / max |ref| over the floating output leaves (inf when the structures differ)."""
    a, sa = pytree.tree_flatten(ref)
    b, sb = pytree.tree_flatten(out)
    if len(a) != len(b):
        return math.inf, math.inf
    worst, median = 0.0, 0.0
    for x, y in zip(a, b):
        if not isinstance(x, torch.Tensor):
            continue
        if not isinstance(y, torch.Tensor) or tuple(x.shape) != tuple(y.shape):
            return math.inf, math.inf
        if not x.is_floating_point():
            if not torch.equal(x, y.to(x.dtype)):
                return math.inf, math.inf
            continue
        x, y = x.detach().float(), y.detach().float()
        if x.numel() == 0:
            continue
        if not torch.isfinite(y).all():
            return math.inf, math.inf
        scale = max(float(x.abs().max()), 1e-6)
        d = (x - y).abs()
        worst = max(worst, float(d.max()) / scale)
        median = max(median, float(d.flatten().median()) / scale)
    return worst, median


def _interleaved_ms(calls: dict, repeats: int, budget_s: float = 6.0) -> dict:
    """Median ms of each call in steady state, timed round-robin so that a drift in the machine's speed hits
    every candidate alike: each round gives each candidate one untimed call, then two timed ones; at least
    3 rounds, then rounds until ``repeats`` or ``budget_s``.

    The untimed call pays the switch from the previous candidate (its threads waking while the last
    runtime's wind down, caches refilled): a user calls one model again and again, and timing one call
    of each in turn had charged a 2-3 ms CNN 2-3x its own ms on ONNX Runtime (the digits CNN: 6.7 ms in
    auto's timing, 2.6 ms alone, where OpenVINO read 3.6 ms), so auto picked the slower runtime."""
    times: dict = {k: [] for k in calls}
    with torch.no_grad():
        for f in calls.values():
            f()
            f()
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget_s):
            for k, f in calls.items():
                if len(calls) > 1:
                    f()
                for _ in range(2):
                    t0 = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def choose_runtime(gm: fx.GraphModule, args: tuple, kwargs: dict, runtime: str, *,
                   candidates: Iterable[str] | None = None, verify_inputs: list | None = None,
                   original: Any = None, reference: Any = None, repeats: int = 10,
                   threads: int | None = None, tolerance: float | None = None,
                   median_tolerance: float | None = None, onnx: bytes | None = None) -> tuple[Any, dict]:
    """The module to hand back for ``runtime`` (``gm`` itself for ``torch``) and the decision record.

    ``runtime``: ``auto`` or a name in :data:`~fxopt.runtime.engines.RUNTIMES`. A named runtime that
    is missing or cannot run the graph raises :class:`~fxopt.errors.RuntimeUnavailable`; one whose
    outputs disagree raises it too (``auto`` skips both, with the reason in the record).
    ``original``: the uncompressed model, timed too so the record says what the user gained;
    ``reference``: its outputs on the example inputs (the quantization or bf16/fp16 rounding error of ``gm``
    bounds a quantized or low-precision graph's runtime; without it, and without ``tolerance``, only the
    floors apply: ``1e-2`` worst, ``1e-4`` median).
    ``onnx``: an ONNX model of ``gm`` already made (a saved file's); ``repeats=0``: check, do not time.
    """
    if runtime != "auto":
        get_runtime(runtime)
        names = [runtime]
    else:
        names = list(candidates) if candidates is not None else list(AUTO_CANDIDATES)
        for n in names:
            get_runtime(n)
        if "torch" not in names:
            names.insert(0, "torch")
    inputs = [(args, kwargs)] + [_as_call(v) for v in (verify_inputs or [])]
    with torch.no_grad():
        refs = [gm(*a, **k) for a, k in inputs]
    quantized = _is_quantized(gm)
    low = _is_low_precision(gm)
    # (accuracy margin against the float model, worst/median distance from fxopt's graph in units of its
    # error); a graph both quantized and cast gets the looser of each bound
    rules = ([QUANT_RULE] if quantized else []) + ([LOW_PRECISION_RULE] if low else [])
    margin, near, near_median = (tuple(max(r[i] for r in rules) for i in range(3)) if rules else QUANT_RULE)
    median_tol = None
    if tolerance is not None:
        tol, median_tol = tolerance, median_tolerance
    elif quantized or low:
        q_max, q_med = agreement(reference, refs[0]) if reference is not None else (0.0, 0.0)
        q_max, q_med = (q_max, q_med) if math.isfinite(q_max) else (0.0, 0.0)
        tol = max(QUANT_TOLERANCE, near * q_max)
        median_tol = max(FLOAT_TOLERANCE, near_median * q_med)
    else:
        tol = FLOAT_TOLERANCE
    quant_err = (q_max, q_med) if (quantized or low) and reference is not None else None
    record: dict[str, Any] = {"asked": runtime, "tolerance": tol, "median_tolerance": median_tol,
                              "quant_err": quant_err, "quantized": quantized, "low_precision": low,
                              "candidates": {}, "threads": threads or torch.get_num_threads()}
    built: dict[str, Built] = {}
    onnx_data: bytes | None = onnx
    if onnx is not None:
        from fxopt.kernels import cpu_isa
        from fxopt.runtime.onnx_prepare import eight_bit_products, exact_here
        # made on a CPU with VNNI, its int8 x int8 layers would saturate here. The graph decides, not what the
        # file says of itself: a file can be edited, and its checksum with it
        if not exact_here(onnx) or (not cpu_isa.dot_products_exact() and any(eight_bit_products(gm))):
            onnx_data = None
            record["reexported"] = ("the given ONNX model's int8 layers are exact only on CPUs with VNNI/AMX; "
                                    "exported again from the graph for this CPU")
    onnx_error: str | None = None
    for name in names:
        rt = RUNTIMES[name]
        entry: dict[str, Any] = {}
        record["candidates"][name] = entry
        why = rt.why_unavailable()
        if why:
            entry["refused"] = why
            continue
        if "onnx" in rt.needs and onnx_data is None and onnx_error is None:
            from fxopt.runtime.onnx_export import onnx_bytes
            t0 = time.perf_counter()
            try:
                onnx_data = onnx_bytes(gm, (args, kwargs), portable=False)
                record["onnx_bytes"] = len(onnx_data)
                record["export_s"] = round(time.perf_counter() - t0, 2)
            except Exception as e:  # ExportError: every ONNX runtime is refused with it
                onnx_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if "onnx" in rt.needs and onnx_error is not None:
            entry["refused"] = f"ONNX export failed: {onnx_error}"
            continue
        t0 = time.perf_counter()
        try:
            b = build_runtime(name, gm, args, kwargs, threads=threads, onnx=onnx_data)
            entry["build_s"] = round(time.perf_counter() - t0, 2)
            # per-layer choices the runtime measured (ONNX Runtime's small convs, int8 or float)
            entry.update({k: b.info[k] for k in ("float_convs", "int8_convs_kept") if b.info.get(k)})
            with torch.no_grad():
                outs = [b.run(a, k) for a, k in inputs]
            errs = [agreement(r, o) for r, o in zip(refs, outs)]
            err, med = max(e[0] for e in errs), max(e[1] for e in errs)
            vs_float = agreement(reference, outs[0]) if quant_err is not None else None  # outs[0]: the example
        except (RuntimeUnavailable, InputError) as e:
            entry["refused"] = str(e).splitlines()[0]
            continue
        except Exception as e:
            entry["refused"] = f"runtime '{name}' failed on the example inputs: {type(e).__name__}: " \
                               f"{(str(e).strip().splitlines() or [''])[0][:300]}"
            continue
        entry["max_rel_err"], entry["median_rel_err"] = err, med
        if not err <= tol:
            entry["refused"] = (f"outputs differ from fxopt's graph by {err:.3g} of their magnitude "
                                f"(tolerance {tol:.3g})")
            continue
        if vs_float is not None:
            entry["err_vs_float"] = vs_float
            if not (vs_float[0] <= margin * quant_err[0] + 1e-4 and vs_float[1] <= margin * quant_err[1] + 1e-4):
                entry["refused"] = (f"less accurate than fxopt's graph: error against the float model {vs_float[0]:.3g} "
                                    f"(median {vs_float[1]:.3g}) vs fxopt's {quant_err[0]:.3g} ({quant_err[1]:.3g})")
                continue
        if median_tol is not None and not med <= median_tol:
            entry["refused"] = (f"a different arithmetic: the median output differs from fxopt's graph by {med:.3g} "
                                f"of the magnitude (tolerance {median_tol:.3g})")
            continue
        built[name] = b
    if runtime != "auto":
        entry = record["candidates"][runtime]
        if "refused" in entry:
            raise RuntimeUnavailable(entry["refused"] + ("" if runtime == "torch" else
                                                         "; runtime='auto' picks among those that work"))
    if repeats > 0:
        calls = {name: _call_of(b, args, kwargs) for name, b in built.items()}
        if original is not None:
            calls[" original"] = lambda: original(*args, **kwargs)
        for name, ms in _interleaved_ms(calls, repeats).items():
            if name == " original":
                record["original_ms"] = round(ms, 4)
            else:
                record["candidates"][name]["ms"] = round(ms, 4)
    timed = {n: record["candidates"][n]["ms"] for n in built if "ms" in record["candidates"][n]}
    chosen = runtime if runtime != "auto" else (min(timed, key=timed.__getitem__) if timed else "torch")
    record["chosen"] = chosen
    if runtime == "auto":
        others = ", ".join(f"{n} {timed[n]:.3g} ms" for n in timed if n != chosen)
        record["why"] = (f"fastest of the runtimes that agree with fxopt's graph on the example inputs: {chosen} "
                         f"{timed.get(chosen, float('nan')):.3g} ms" + (f" (vs {others})" if others else ""))
    else:
        record["why"] = f"asked for runtime={runtime!r}"
    if chosen == "torch":
        return gm, record
    return RuntimeModule(gm, chosen, built[chosen]), record


def _call_of(b: Built, args: tuple, kwargs: dict) -> Any:
    return lambda: b.run(args, kwargs)


def _as_call(v: Any) -> tuple[tuple, dict]:
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], dict) and isinstance(v[0], (tuple, list)):
        return tuple(v[0]), dict(v[1])
    if isinstance(v, dict):
        return (), dict(v)
    if isinstance(v, (tuple, list)):
        return tuple(v), {}
    return (v,), {}


def describe(record: dict) -> str:
    """The decision as text (what ``print(history)`` shows)."""
    lines = [f"runtime: {record.get('chosen')} ({record.get('why')})"]
    if record.get("reexported"):
        lines.append(f"  {record['reexported']}")
    if record.get("quant_err"):
        qm, qd = record["quant_err"]
        kind = " and ".join(k for k, on in (("quantization", record.get("quantized")),
                                            ("bf16/fp16 rounding", record.get("low_precision"))) if on) or "quantization"
        lines.append(f"  {kind} error of fxopt's graph vs the float model: max {qm:.3g}, median {qd:.3g} "
                     "(relative to the output's magnitude)")
    if record.get("original_ms") is not None:
        lines.append(f"  original model (eager): {record['original_ms']:.4g} ms")
    for name, e in record.get("candidates", {}).items():
        if "refused" in e:
            lines.append(f"  {name}: refused: {e['refused']}")
        else:
            ms = f"{e['ms']:.4g} ms" if "ms" in e else "not timed"
            err, med = e.get("max_rel_err"), e.get("median_rel_err")
            lines.append(f"  {name}: {ms}, rel err max {err:.2g} median {med:.2g} (tolerance {record.get('tolerance'):.3g})"
                         + (f", built in {e['build_s']:.1f} s" if e.get("build_s") else ""))
            for key, what in (("float_convs", "run as float convs (faster than their int8 form, model ms int8 -> "
                                              "float)"), ("int8_convs_kept", "kept int8 (float no faster)")):
                if e.get(key):
                    lines.append(f"    {what}: " + ", ".join(f"{c} {a:.3g} -> {b:.3g}" for c, (a, b) in e[key].items()))
    return "\n".join(lines)


def warn_if_slower(record: dict, model_name: str = "the compiled model") -> None:
    """Say loudly when what is handed back is slower than the original on the example inputs."""
    orig = record.get("original_ms")
    chosen = record.get("candidates", {}).get(record.get("chosen"), {})
    ms = chosen.get("ms")
    if orig and ms and ms > orig * 1.05:
        warnings.warn(f"fxopt.compile: {model_name} runs slower than the original on the example inputs "
                      f"({ms:.3g} ms vs {orig:.3g} ms on runtime {record.get('chosen')}); the recipe does not pay "
                      "off on this CPU: try another recipe or runtime='auto'", RuntimeWarning, stacklevel=3)

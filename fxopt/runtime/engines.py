"""The runtimes an optimized graph runs on, and the module that calls one like the original model.

=================  ==========================================================  =======================
runtime            how the graph gets there                                    install
=================  ==========================================================  =======================
``torch``          fxopt's own graph on eager PyTorch (fbgemm/oneDNN kernels)   always
``inductor``       ``torch.compile`` of the graph                               always (needs a C++
                                                                                compiler; slow to build)
``onnxruntime``    :func:`fxopt.export_onnx`, an ONNX Runtime CPU session       ``fxopt[onnxruntime]``
``openvino``       the same ONNX file, compiled by OpenVINO for the CPU         ``fxopt[openvino]``
=================  ==========================================================  =======================

Sessions are made so that they compute what the graph computes and share the CPU politely: as many
threads as ``torch.get_num_threads()``, worker threads that sleep instead of spinning after a call
(ONNX Runtime's ``allow_spinning=0``; spinning threads measured 4x slower PyTorch calls on 2 cores),
fp32 arithmetic where the runtime would silently lower it (ONNX Runtime's int8-activation
``MatMulNBits`` for weight-only layers, OpenVINO's bf16 default on CPUs with AMX or AVX-512 bf16 and its
int8 "dynamic quantization" of the activations of layers with int8/int4 weights). ONNX Runtime's int8 conv
is slower than its float conv over a few input channels (a CNN's first conv): such convs are timed both
ways in the whole model and run as float convs on the same dequantized values where that is faster
(:func:`tune_onnxruntime`; ``runtime_info["float_convs"]``).

:class:`RuntimeModule` is what ``fxopt.compile(..., runtime=...)`` returns for a runtime other than
``torch``: it is called exactly like the original model (positional or keyword inputs, the same output
structure), checks the call as a compiled graph does, and keeps the fxopt graph (``graph_module``) it
was built from, its history and the runtime's artifact (the ONNX bytes).
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import InputError, RuntimeUnavailable

__all__ = ["RUNTIMES", "Runtime", "RuntimeModule", "list_runtimes", "get_runtime", "build_runtime"]


@dataclass(frozen=True)
class Runtime:
    """A runtime: ``name``, the modules it needs, the pip extra that installs them, what it is."""
    name: str
    needs: tuple[str, ...]
    extra: str | None
    doc: str
    build: Callable[..., "Built"] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]

    @property
    def available(self) -> bool:
        return not self.missing()

    def why_unavailable(self) -> str | None:
        missing = self.missing()
        if not missing:
            return None
        how = f'pip install "fxopt[{self.extra}]"' if self.extra else f"pip install {' '.join(missing)}"
        return f"runtime '{self.name}' needs {', '.join(missing)} ({how})"


@dataclass
class Built:
    """A graph handed to a runtime: ``run(args, kwargs)`` -> outputs in the model's structure."""
    run: Callable[[tuple, dict], Any]
    artifact: bytes | None = None  # the ONNX model, for save and inspection
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- flat calls
def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    from fxopt.ir.input_guard import check_call
    args, kwargs = check_call(gm, args, kwargs)
    spec = getattr(gm, "_in_spec", None)
    if spec is not None and spec.num_children == 2:
        kwargs = {k: kwargs[k] for k in spec.children()[1].context if k in kwargs}
    return [t for t in pytree.tree_leaves((tuple(args), kwargs)) if isinstance(t, torch.Tensor)]


def _unflatten(gm: fx.GraphModule, outs: list[torch.Tensor]) -> Any:
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return outs[0] if len(outs) == 1 else tuple(outs)
    return pytree.tree_unflatten(outs, spec)


def _numpy(t: torch.Tensor) -> Any:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        raise RuntimeUnavailable("a bfloat16 input cannot be handed to this runtime through numpy")
    return t.cpu().contiguous().numpy()


# ---------------------------------------------------------------- builders
def _build_torch(gm: fx.GraphModule, args: tuple, kwargs: dict, **_: Any) -> Built:
    def run(a: tuple, k: dict) -> Any:
        return gm(*a, **k)
    return Built(run)


def _build_inductor(gm: fx.GraphModule, args: tuple, kwargs: dict, **_: Any) -> Built:
    compiled = torch.compile(gm, dynamic=None)
    # build now (a cold compile takes tens of seconds here), not on the user's first call
    with torch.no_grad():
        compiled(*args, **kwargs)

    def run(a: tuple, k: dict) -> Any:
        return compiled(*a, **k)
    return Built(run)


def _ort_session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # ORT rewrites DequantizeLinear -> MatMul into MatMulNBits with int8 activations by default: a
    # different (lossier) arithmetic than the weight-only layer's; keep fp32 activations
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _median_ms(sess: Any, feeds: dict, calls: int) -> float:
    import time
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


#: a float conv is kept only where the whole model measured at least this much faster with it
FLOAT_CONV_GAIN = 1.03
#: the file's metadata key holding :func:`tune_onnxruntime`'s decision (JSON), so it is made once
TUNED_KEY = "fxopt.onnxruntime_convs"


def tune_onnxruntime(data: bytes, feeds: dict, threads: int, calls: int = 15) -> tuple[bytes, dict]:
    """Run as float convs the small int8 convs that ONNX Runtime runs slower than float, measured.

    ONNX Runtime's int8 conv can be slower than its float conv on the same values for convs over a few
    input channels (a digits CNN's first conv reads one; see
    :data:`~fxopt.runtime.onnx_prepare.SMALL_CONV_REDUCTION`). Each candidate
    (:func:`~fxopt.runtime.onnx_prepare.small_int8_convs`) is tried in turn: the whole model is timed
    on ``feeds`` with it read through float arithmetic (:func:`~fxopt.runtime.onnx_prepare.float_convs`)
    and kept where that is at least :data:`FLOAT_CONV_GAIN` faster (the layout changes around a conv
    count too, so the model is timed, not the conv). Returns the model ONNX Runtime runs and what was
    timed (``{"float_convs": {name: [int8 ms, float ms]}, "int8_convs_kept": ...}``, the model's ms with
    the conv in int8 and in float; empty where there was nothing to try). The decision is written into
    the returned file (:data:`TUNED_KEY`): a saved or copied model's file is not timed again.
    """
    import json
    import onnx
    from fxopt.runtime.onnx_prepare import float_convs, small_int8_convs
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    if TUNED_KEY in props:  # tuned when it was made (a saved model's file, a copy's): not timed again
        try:
            done = json.loads(props[TUNED_KEY])
        except ValueError:
            done = None
        if _valid_tuning(done):
            return data, done
    todo = small_int8_convs(proto)
    if not todo:
        return data, {}
    best_sess, kept, timed, failed = _warm(_ort_session(data, threads), feeds), [], {}, {}
    # about half a second per side and round: 15 calls of a small CNN, 3 of a 150 ms model
    calls = max(3, min(calls, int(500 / max(_median_ms(best_sess, feeds, 3), 1e-3))))
    for name in todo:
        try:
            sess = _warm(_ort_session(float_convs(proto, kept + [name]).SerializeToString(), threads), feeds)
        except Exception as e:  # the file as exported still runs: keep the conv int8, say why
            failed[name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            continue
        # rounds alternate between the two, each side's best median counts: a slow spell of the machine
        # (measured: the same file 2.6 and 3.8 ms a second apart) then hits both or neither
        base = ms = float("inf")
        for _ in range(3):
            base = min(base, _median_ms(best_sess, feeds, calls))
            ms = min(ms, _median_ms(sess, feeds, calls))
        timed[name] = [round(base, 3), round(ms, 3)]
        if ms * FLOAT_CONV_GAIN <= base:
            best_sess, kept = sess, kept + [name]
    info = {"float_convs": {k: v for k, v in timed.items() if k in kept},
            "int8_convs_kept": {k: v for k, v in timed.items() if k not in kept}}
    if failed:
        info["float_convs_failed"] = failed
    out = float_convs(proto, kept)
    for old in [p for p in out.metadata_props if p.key == TUNED_KEY]:  # a malformed one read above
        out.metadata_props.remove(old)
    entry = out.metadata_props.add()
    entry.key, entry.value = TUNED_KEY, json.dumps(info)
    return out.SerializeToString(), info


def _valid_tuning(done: Any) -> bool:
    """Is ``done`` a decision :func:`tune_onnxruntime` writes (a file's metadata is data from anywhere: a
    malformed one is timed again instead of reaching the history)?"""
    def timings(v: Any) -> bool:
        return isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(t, list) and len(t) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in t) for k, t in v.items())
    return (isinstance(done, dict) and set(done) <= {"float_convs", "int8_convs_kept", "float_convs_failed"}
            and timings(done.get("float_convs", {})) and timings(done.get("int8_convs_kept", {}))
            and isinstance(done.get("float_convs_failed", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in done.get("float_convs_failed", {}).items()))


def _warm(sess: Any, feeds: dict) -> Any:
    for _ in range(3):
        sess.run(None, feeds)
    return sess


def _build_onnxruntime(gm: fx.GraphModule, args: tuple, kwargs: dict, *, threads: int,
                       onnx: bytes | None = None, tune: bool = True, **_: Any) -> Built:
    from fxopt.runtime.onnx_export import onnx_bytes
    data = onnx if onnx is not None else onnx_bytes(gm, (args, kwargs), portable=False)
    sess = _ort_session(data, threads)
    names = [i.name for i in sess.get_inputs()]
    info: dict = {}
    flat = _flat_inputs(gm, args, kwargs)
    if tune and len(flat) == len(names):
        data, info = tune_onnxruntime(data, {n: _numpy(t) for n, t in zip(names, flat)}, threads)
        if info.get("float_convs"):
            sess = _ort_session(data, threads)
    lock = threading.Lock()  # one run at a time per session: ORT sessions are thread-safe, numpy views are not shared

    def run(a: tuple, k: dict) -> Any:
        flat = _flat_inputs(gm, a, k)
        if len(flat) != len(names):
            raise InputError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), the call gives "
                             f"{len(flat)} tensor(s)")
        with lock:
            outs = sess.run(None, {n: _numpy(t) for n, t in zip(names, flat)})
        return _unflatten(gm, [torch.from_numpy(o) for o in outs])
    return Built(run, data, {"inputs": names, "outputs": [o.name for o in sess.get_outputs()], **info})


#: OpenVINO's CPU plugin lowers precision on its own twice: bf16 activations by default on CPUs with AMX or
#: AVX-512 BF16, and, even at f32, per-group int8 activations ("dynamic quantization", groups of 32) for
#: layers whose weights are int8/int4 constants (on CPUs with int8 dot products): fxopt's weight-only layers
#: (int8-weight, int4-weight) then compute something else, less accurately, and ``runtime="auto"`` refused
#: OpenVINO for them. Both are switched off: the runtime computes what fxopt's graph computes
#: (tests/runtime/test_runtimes.py::test_openvino_keeps_weight_only_layers_on_float_activations).
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}


def _build_openvino(gm: fx.GraphModule, args: tuple, kwargs: dict, *, threads: int,
                    onnx: bytes | None = None, **_: Any) -> Built:
    import openvino as ov
    from fxopt.runtime.onnx_export import onnx_bytes
    data = onnx if onnx is not None else onnx_bytes(gm, (args, kwargs), portable=False)
    core = ov.Core()
    model = core.read_model(data)
    compiled = core.compile_model(model, "CPU", OPENVINO_CONFIG | {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    n_in = len(compiled.inputs)
    lock = threading.Lock()

    def run(a: tuple, k: dict) -> Any:
        flat = _flat_inputs(gm, a, k)
        if len(flat) != n_in:
            raise InputError(f"the OpenVINO model takes {n_in} input(s), the call gives {len(flat)} tensor(s)")
        with lock:
            request.infer({i: _numpy(t) for i, t in enumerate(flat)})
            outs = [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(compiled.outputs))]
        return _unflatten(gm, outs)
    return Built(run, data, {"device": "CPU", "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
                             "dynamic_quantization": int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))})


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime("torch", (), None, "fxopt's graph on eager PyTorch with fxopt's CPU kernels", _build_torch),
    "onnxruntime": Runtime("onnxruntime", ("onnxruntime", "onnx", "onnxscript"), "onnxruntime",
                           "ONNX Runtime (CPU) running the exported graph", _build_onnxruntime),
    "openvino": Runtime("openvino", ("openvino", "onnx", "onnxscript"), "openvino",
                        "OpenVINO (CPU) running the exported graph", _build_openvino),
    "inductor": Runtime("inductor", (), None, "torch.compile (Inductor) of fxopt's graph", _build_inductor),
}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; choose one of auto, {', '.join(RUNTIMES)} "
                                 "(fxopt runtimes lists what is installed)")
    return RUNTIMES[name]


def list_runtimes() -> dict[str, str | None]:
    """runtime name -> None when installed, else what to install."""
    return {name: rt.why_unavailable() for name, rt in RUNTIMES.items()}


def build_runtime(name: str, gm: fx.GraphModule, args: tuple, kwargs: dict, *, threads: int | None = None,
                  onnx: bytes | None = None, tune: bool = True) -> Built:
    """Hand ``gm`` to runtime ``name``; raises RuntimeUnavailable when it is missing or cannot take the graph.
    ``tune=False``: run the ONNX file exactly as given (no :func:`tune_onnxruntime`)."""
    rt = get_runtime(name)
    why = rt.why_unavailable()
    if why:
        raise RuntimeUnavailable(why)
    try:
        return rt.build(gm, args, kwargs, threads=threads or torch.get_num_threads(), onnx=onnx, tune=tune)
    except (RuntimeUnavailable, InputError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeUnavailable(f"runtime '{name}' cannot run this graph: {type(e).__name__}: {first}") from e


class RuntimeModule(torch.nn.Module):
    """An optimized graph running on another runtime, called exactly like the original model.

    ``graph_module``: the fxopt graph it runs (inspect, ``fxopt.summary``, fall back to it);
    ``runtime``: the runtime's name; ``artifact``: what was handed to the runtime (ONNX bytes);
    ``fxopt_history``: the compile history, with the runtime choice in ``history.runtime``.
    """

    def __init__(self, graph_module: fx.GraphModule, runtime: str, built: Built):
        super().__init__()
        self.graph_module = graph_module
        self.runtime = runtime
        self._built = built
        self.artifact = built.artifact
        self.runtime_info = dict(built.info)

    @property
    def fxopt_history(self) -> Any:
        return getattr(self.graph_module, "fxopt_history", None)

    @property
    def meta(self) -> dict:
        return self.graph_module.meta

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._built.run(args, kwargs)

    def extra_repr(self) -> str:
        return f"runtime={self.runtime!r}"

    def __deepcopy__(self, memo: dict) -> "RuntimeModule":
        """A copy with its own graph and its own runtime session, built again from the artifact."""
        import copy
        from fxopt.ir.capture import example_call
        gm = copy.deepcopy(self.graph_module, memo)
        args, kwargs = example_call(gm, None, "copying a RuntimeModule")
        built = build_runtime(self.runtime, gm, args, kwargs, onnx=self.artifact)
        return RuntimeModule(gm, self.runtime, built)

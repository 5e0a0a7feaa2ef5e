"""``lower-quant``: replace the simulated QDQ patterns with real integer kernels.

Matches what ``insert-qdq`` wrote and emits the ``torch.ops.fxopt`` kernels of
:mod:`fxopt.kernels.cpu_quant`, by the ``quant`` rules of :mod:`fxopt.passes.lower.rules`
for the graph's device (``target=auto``, the default; ``target=cpu|cuda`` lowers for another
device: a graph captured on a CPU machine can be lowered for a GPU), the first accepting rule
winning; the CUDA rows (:mod:`fxopt.passes.lower.rules_cuda`) emit the Triton ops of
:mod:`fxopt.kernels.triton_int8` and :mod:`~fxopt.kernels.triton_wq`. The table, generated
from the rules:

{rules}

Each layer's typed :class:`~fxopt.quant.annotation.QuantAnnotation` (left by ``insert-qdq``)
says its code width, symmetry and group size. 4-bit weights are packed two per byte here. A
pattern whose specs the kernels do not support (asymmetric int8 weights for fbgemm, say) stays
simulated and is listed in the record as ``kept``. The lowered model agrees with the simulated
one to integer rounding (``check_layers`` runs every int8 kernel next to its simulated formula
on the example inputs and fails the pass, which the manager rolls back, when they differ beyond
float rounding; end to end, rare rounding flips grow through deep nets, so the manager records
the output change instead of bounding it).

Only where it pays. On CUDA (``decline=auto``, the default, or ``slower``) every lowered layer is timed
on the device per row-count bucket against cuBLAS int8 and its float form, and keeps the fastest
per bucket (see :mod:`fxopt.passes.lower.rules_cuda`). On CPU, when asked (``decline=slower``): while the check runs, each int8 layer's
kernel (on its chosen engine) is timed against its float form (``linear``/``conv2d`` of the same
dequantized weights, interleaved, median of 3-7 calls on its example-input shapes); a kernel more
than 1.15x slower is declined and the layer runs in float, its weights' quantized values stored as
fp32 (its bytes go back up; it drops the activation rounding, so it is at least as accurate). The
record lists each declined layer with both timings (``info["declined"]``). ``decline=never`` (what
``auto`` means on CPU) keeps every kernel: the decision can only use the example inputs' shapes, and at the few
tokens examples usually carry the per-token quantization makes most of MiniLM's int8 layers measure
slower than fp32 (31 of 37 at 2x16 tokens on a 2-core AVX-512 VNNI Xeon) while the same model runs
2x faster than fp32 at 8x128; declining from the example would drop int8 (and its bytes) for the
batch sizes that run later. ``fxopt.compile`` warns when the whole model measures slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.kernels import cpu_isa
from fxopt.ir.dialect import aten
from fxopt.kernels.cpu_quant import QDQ_REFERENCES, REFERENCES, int8_layer_plans, weight_bits
from fxopt.quant.annotation import QuantAnnotation
from fxopt.ir.meta import propagate_meta
from fxopt.passes.lower import rules, rules_cuda
from fxopt.kernels import triton_int8, triton_wq
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead

__doc__ = __doc__.replace("{rules}", rules.table("quant"))  # the rule table, as the docs show it

__all__ = ["LowerQuantPass"]

fxq = torch.ops.fxopt
_LAYERS = (aten.linear.default, aten.conv2d.default, aten.embedding.default)


@register_pass
class LowerQuantPass(Pass):
    """Swap simulated quantize/dequantize patterns for integer kernels by the rule table (see module docs)."""

    name = "lower-quant"
    # outputs move by rounding flips that grow through deep nets; each layer is checked instead
    preserves_semantics = False

    @dataclass(frozen=True)
    class Config:
        pack_int4: bool = True
        # which engine runs each int8 layer: "auto" times every engine that is exact for the layer's codes
        # on its example-input shapes and keeps the fastest; "fbgemm"/"onednn" where exact (else the other)
        engine: str = "auto"
        # "slower": an int8 layer whose kernel is measured slower than its float form (the same dequantized
        # weights in fp32) on its example-input shapes runs in float; "never": keep every kernel; "auto"
        # (default): never on CPU, slower on CUDA (timed per row bucket on the device, see rules_cuda)
        decline: str = "auto"
        # the device whose rules apply: auto (the graph's), cpu or cuda (lower for a GPU from any machine)
        target: str = "auto"

        def __post_init__(self) -> None:
            if self.engine not in ("auto",) + cpu_isa.ENGINES:
                raise ValueError(f"lower-quant(engine=...) takes auto, {', '.join(cpu_isa.ENGINES)}; "
                                 f"got {self.engine!r}")
            if self.decline not in ("auto", "slower", "never"):
                raise ValueError(f"lower-quant(decline=...) is 'slower' (run an int8 layer measured slower than "
                                 f"its float form in float), 'never' or 'auto', got {self.decline!r}")
            if self.target not in ("auto", "cpu", "cuda"):
                raise ValueError(f"lower-quant(target=...) is auto (the graph's device), cpu or cuda; "
                                 f"got {self.target!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        kept: list[str] = []
        device = rules.graph_device(gm, ctx.args) if self.config.target == "auto" else self.config.target
        # two sweeps: the layers take their quantized inputs first; a dq(q(x)) only float ops still read
        # (the quantize_dequantize rule) is known only once its layer consumers are lowered
        for sweep in (1, 2):
            for node in list(gm.graph.nodes):
                if node.op != "call_function" or getattr(node, "_erased", False):
                    continue
                found = rules.first_rule(gm, node, "quant", device, self.config)
                kind = found[0].build(found[1], found[0]) if found is not None else None
                if kind:
                    counts[kind] = counts.get(kind, 0) + 1
                elif sweep == 1 and node.target in _LAYERS and QuantAnnotation.of(node) is not None:
                    kept.append(node.name)
            erase_dead(gm)
        if not counts:
            return PassResult(False, info={"kept": kept})
        _reshape_channels_last_views(gm)
        propagate_meta(gm)
        cpu_decline = self.config.decline == "slower" and device == "cpu"
        chooser = EngineChooser(self.config.engine, time_float=cpu_decline)
        worst = check_layers(gm, ctx, chooser)
        info: dict[str, Any] = {"lowered": counts, "kept": kept, "worst_layer_error": worst}
        if device != "cpu":
            info["device"] = device
            plans = rules_cuda.gpu_plans(gm)
            if plans:
                info["gpu_plans"] = plans
            if rules_cuda.declined_gpu(gm):
                info["declined"] = rules_cuda.declined_gpu(gm)
        if chooser.timings:
            info["engine_ms"] = chooser.timings
        declined = decline_slower(gm, chooser.float_ms) if cpu_decline else {}
        if declined:
            info["declined"] = declined
            erase_dead(gm)
            propagate_meta(gm)
        kernels = layer_kernels(gm)
        if kernels:
            info["cpu"] = cpu_isa.cpu_info(probe=False).isa + (f" (plan forced: {cpu_isa.forced_isa()})"
                                                               if cpu_isa.forced_isa() else "")
            info["int8_kernels"] = _summarize(kernels)
            info["layer_kernels"] = kernels
        return PassResult(True, frozenset({"shapes"}), info)


def _reshape_channels_last_views(gm: fx.GraphModule) -> int:
    """``view``s of what an int8 conv computed become ``reshape``s.

    The CPU engines compute convs channels-last and fxopt's kernel returns their layout (a copy back
    would cost a pass over every activation); elementwise ops keep it, so a ``view`` downstream (the
    ``flatten`` before a classifier) may not be expressible as a view of those strides. ``reshape`` is
    the same view wherever one exists and copies only where none does.
    """
    tainted: set[fx.Node] = set()
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is fxq.conv2d_int8.default or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
            if node.target is torch.ops.aten.view.default:
                node.target = torch.ops.aten.reshape.default
                changed += 1
    if changed:
        gm.recompile()
    return changed


# ---------------------------------------------------------------- engine choice
_INT8 = {fxq.linear_int8.default: "linear", fxq.linear_int8_dynamic.default: "linear", fxq.conv2d_int8.default: "conv"}
_TIMED: dict[tuple, dict[str, float]] = {}  # (kernel, argument shapes and options) -> engine -> ms, per process


def _exact_engines(kernel: Any, args: tuple) -> list[str]:
    from fxopt.kernels.cpu_quant import _plan_key
    kind, bits, shape = _plan_key(kernel, list(args), tuple(args[1].shape))
    wb = weight_bits(args[1])
    return [e for e in cpu_isa.ENGINES if cpu_isa.exact_bits(e, kind, shape, wb) >= bits]


def _time_engines(kernel: Any, args: tuple, engines: list[str], float_form: bool = False) -> dict[str, float]:
    """Median milliseconds of ``kernel`` on ``args`` with each engine (interleaved rounds, warm caches);
    with ``float_form`` also the layer's float form (:func:`_float_call`), under the key float."""
    import time
    key = (kernel, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else tuple(a) if isinstance(a, list) else a
                         for a in args[:-1]), tuple(engines), float_form)
    if key in _TIMED:
        return _TIMED[key]
    calls = {e: (lambda e=e: kernel(*args[:-1], e)) for e in engines}
    if float_form:
        calls["float"] = _float_call(kernel, args)
    times: dict[str, list[float]] = {e: [] for e in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up: packs the weights, faults in the buffers
            call()
        rounds, spent = 0, 0.0
        while rounds < 7 and (rounds < 3 or spent < 0.2):  # 3-7 rounds, about 0.2 s at most per layer shape
            for e, call in calls.items():
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                times[e].append(dt * 1e3)
                spent += dt
            rounds += 1
    _TIMED[key] = {e: sorted(v)[len(v) // 2] for e, v in times.items()}
    return _TIMED[key]


class EngineChooser:
    """Picks each int8 layer's engine from the arguments it gets on the example inputs (``check_layers``
    calls it on a layer's first call, so choosing costs no extra run of the model).

    ``engine="auto"`` times every engine that is exact for the layer's codes on this CPU (once per
    distinct layer shape in a process) and keeps the fastest; a named engine is used where it is exact.
    ``timings``: layer -> engine -> ms, for the record.
    """

    def __init__(self, engine: str = "auto", time_float: bool = False):
        self.engine, self.timings = engine, {}
        #: with ``time_float``: layer -> {"int8": ms of its kernel on the chosen engine, "float": ms of its float form}
        self.time_float, self.float_ms = time_float, {}

    def __call__(self, name: str, kernel: Any, args: tuple) -> str | None:
        engine = self._choose(name, kernel, args)
        if self.time_float:
            run = (*args[:-1], engine or args[-1])
            ms = _time_engines(kernel, run, [engine or args[-1]], float_form=True)
            self.float_ms[name] = {"int8": round(ms[engine or args[-1]], 4), "float": round(ms["float"], 4)}
        return engine

    def _choose(self, name: str, kernel: Any, args: tuple) -> str | None:
        cands = _exact_engines(kernel, args)
        if self.engine != "auto" and self.engine in cands:
            return self.engine
        if len(cands) > 1:
            ms = _time_engines(kernel, args, cands)
            self.timings[name] = {e: round(v, 3) for e, v in ms.items()}
            return min(cands, key=ms.__getitem__)
        return cands[0] if cands else None  # None: no exact engine, the kernel's own fallback decides


# ---------------------------------------------------------------- declining slower int8 layers
#: an int8 kernel is declined when it takes this much longer than the layer's float form (a margin over
#: the timing noise of a median of 3-7 interleaved calls)
DECLINE_RATIO = 1.15


def _float_weight(kernel: Any, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    shape = (-1, 1, 1, 1) if kernel is fxq.conv2d_int8.default else (-1, 1)
    return w_q.float() * w_scale.reshape(shape).float()


def _float_call(kernel: Any, args: tuple) -> Any:
    """The layer of an int8 kernel call in float: its dequantized weights, no activation quantization."""
    import torch.nn.functional as F
    x, w, bias = args[0], _float_weight(kernel, args[1], args[2]), args[3]
    if kernel is fxq.conv2d_int8.default:
        stride, padding, dilation, groups, relu = args[4], args[5], args[6], args[7], args[12]
        return lambda: (lambda y: y.relu_() if relu else y)(F.conv2d(x, w, bias, stride, padding, dilation, groups))
    return lambda: F.linear(x, w, bias)


def decline_slower(gm: fx.GraphModule, float_ms: dict[str, dict[str, float]]) -> dict[str, str]:
    """Run in float every int8 layer whose kernel was measured slower than its float form; layer -> why.

    The layer keeps its quantized weights' values (dequantized, stored as fp32: its bytes go back up)
    and drops its activation quantization, so it computes at least as accurately as the kernel did.
    """
    declined = {}
    for node in list(gm.graph.nodes):
        ms = float_ms.get(node.name)
        if node.op != "call_function" or node.target not in _INT8 or ms is None:
            continue
        if not ms["int8"] > DECLINE_RATIO * ms["float"]:
            continue
        w_q, w_scale = attr_tensor(gm, node.args[1]), attr_tensor(gm, node.args[2])
        if w_q is None or w_scale is None:
            continue
        owner, _, attr = str(node.args[1].target).rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        name, i = f"{attr}_float", 1
        while hasattr(mod, name):
            name, i = f"{attr}_float_{i}", i + 1
        mod.register_buffer(name, _float_weight(node.target, w_q, w_scale).contiguous())
        g = gm.graph
        with g.inserting_before(node):
            w = g.get_attr(f"{owner}.{name}" if owner else name)
            if node.target is fxq.conv2d_int8.default:
                a = node.args
                new = g.call_function(aten.conv2d.default, (a[0], w, a[3], a[4], a[5], a[6], a[7]))
                out = g.call_function(aten.relu.default, (new,)) if a[12] else new
            else:
                new = out = g.call_function(aten.linear.default, (node.args[0], w, node.args[3]))
        for n in {new, out}:
            copy_meta(n, node)
        node.replace_all_uses_with(out)
        old = node.name
        g.erase_node(node)
        out._rename(old)
        declined[old] = (f"int8 {ms['int8']:.3g} ms vs float {ms['float']:.3g} ms at its example-input shapes: "
                         f"runs in float (lower-quant(decline=never) keeps the kernel)")
    return declined


def layer_kernels(gm: fx.GraphModule) -> dict[str, str]:
    """layer -> "engine aNwM" (or "exact fallback aNwM") for every int8 kernel of ``gm``, as it runs here."""
    return {name: f"{engine or 'exact fallback'} a{bits}w{wb}"
            for name, (engine, bits, wb) in int8_layer_plans(gm).items()}


# ---------------------------------------------------------------- per-layer check
#: kernel -> its simulated QDQ formula (tests swap entries to fake a wrong kernel)
_SIM = {**REFERENCES, **QDQ_REFERENCES,
        fxq.linear_int8_gpu.default: triton_int8.linear_int8_gpu_reference,
        fxq.linear_int8_dynamic_gpu.default: triton_int8.linear_int8_dynamic_gpu_reference,
        fxq.linear_wq_gpu.default: triton_wq.linear_wq_gpu_reference}
_STATIC_LINEARS = (fxq.linear_int8.default, fxq.linear_int8_gpu.default)
_DYNAMIC_LINEARS = (fxq.linear_int8_dynamic.default, fxq.linear_int8_dynamic_gpu.default)


def _allowed(kernel: Any, args: tuple, ref: torch.Tensor) -> float:
    if kernel is fxq.quantize_dequantize.default:
        return 0.0  # the same arithmetic, value for value
    # a static conv requantizes its output: one step of the output scale is rounding
    step = 2.01 * args[10] if kernel is fxq.conv2d_int8.default else 0.0
    rel = 1e-4 if ref.dtype == torch.float32 else 1e-2  # half-precision activations: their own rounding
    return rel * float(ref.abs().max()) + 1e-5 + step


class _Checked:
    """Stands in for a kernel during the check: runs it and its simulated formula on the same inputs."""

    def __init__(self, node: fx.Node, errors: dict, choose: Any = None):
        self.kernel, self.sim, self.node, self.errors = node.target, _SIM[node.target], node, errors
        self.__name__ = f"check_{node.name}"
        self.args: tuple | None = None
        self.choose, self.engine = choose, None

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.choose is not None and self.engine is None and self.kernel in _INT8:  # first call: pick the engine
            self.engine = self.choose(self.node.name, self.kernel, args) or args[-1]
        if self.engine is not None:
            args = (*args[:-1], self.engine)
        out = self.kernel(*args)
        ref = self.sim(*args)
        err = float((out - ref).abs().max()) if out.numel() else 0.0
        allowed = _allowed(self.kernel, args, ref)
        if err > allowed or self.node.name not in self.errors:
            self.errors[self.node.name] = (err, allowed, "on the example inputs")
        self.args = args
        return out


def _codes_to_x(codes: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return (codes.float() - zp) * scale


def _linear_edges(args: tuple, dynamic: bool) -> list[tuple[str, torch.Tensor]]:
    """Inputs with every activation code at its extremes (both signs, aligned with the weights' signs)."""
    w = args[1]
    k = w.shape[1]
    signs = (w[: min(4, w.shape[0])].float() >= 0).cpu()
    if dynamic:
        big = 1e4
        rows = [torch.full((k,), big), torch.full((k,), -big), torch.where(signs[0], big, -big),
                torch.where(signs[-1], -big, big), torch.linspace(-1, 1, k),
                torch.cat([torch.full((1,), 3e3), torch.full((k - 1,), 1e-3)])[:k], torch.zeros(k)]
        return [("all codes at their extremes, both signs", torch.stack(rows))]
    scale, zp, qmax = float(args[4]), int(args[5]), int(args[6])
    top, bottom = torch.full((k,), qmax), torch.zeros(k)
    rows = [top, bottom, torch.where(signs[0], qmax, 0), torch.where(signs[0], 0, qmax),
            torch.where(signs[-1], qmax, 0), torch.randint(0, qmax + 1, (k,), generator=torch.Generator().manual_seed(0))]
    x = _codes_to_x(torch.stack(rows), scale, zp)
    beyond = torch.stack([torch.full((k,), (qmax - zp + 40) * scale), torch.full((k,), (-zp - 40) * scale)])
    return [(f"all codes at their extremes (0 and {qmax}), aligned with the weight signs", x),
            ("inputs beyond the calibrated range", beyond)]


def _conv_edges(args: tuple) -> list[tuple[str, torch.Tensor]]:
    w, stride, padding, dilation, groups = args[1], args[4], args[5], args[6], args[7]
    scale, zp, qmax = float(args[8]), int(args[9]), int(args[13]) if len(args) > 13 else 255
    cin, kh, kw = w.shape[1] * groups, w.shape[2], w.shape[3]
    h = (kh - 1) * dilation[0] + 1 + stride[0] * 2
    ww = (kw - 1) * dilation[1] + 1 + stride[1] * 2
    top = torch.full((1, cin, h, ww), qmax)
    aligned = torch.zeros(1, cin, h, ww)
    first = (w[0].float() >= 0).repeat(groups, 1, 1)  # the first filter's signs, for every group
    for i in range(kh):
        for j in range(kw):
            aligned[0, :, i * dilation[0], j * dilation[1]] = torch.where(first[:, i, j], qmax, 0).float()
    x = torch.cat([top, torch.zeros_like(top), aligned])
    return [(f"all codes at their extremes (0 and {qmax})", _codes_to_x(x, scale, zp))]


def _qdq_edges(args: tuple) -> list[tuple[str, torch.Tensor]]:
    scale, zp, qmax = float(args[1]), int(args[2]), int(args[3])
    codes = torch.arange(-zp - 3, qmax - zp + 4, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    x = torch.cat([codes * s, (codes + 0.5) * s, (codes - 0.5) * s,
                   torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 0.0, -0.0])])
    return [("every code, the halfway points between codes (ties), inputs beyond the range and infinities", x)]


def _wq_edges(args: tuple) -> list[tuple[str, torch.Tensor]]:
    """One row and several (the GEMV and the GEMM paths), large and tiny magnitudes, both signs."""
    k = args[0].shape[-1]
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, k, generator=g) * 1e3
    rows = torch.cat([torch.full((1, k), 1e3), torch.full((1, k), -1e-3), torch.randn(3, k, generator=g)])
    return [("one row of large inputs (the GEMV path)", one), ("several rows, large and tiny, both signs", rows)]


def _edge_errors(node: fx.Node, args: tuple) -> tuple[float, float, str] | None:
    """The worst disagreement of ``node``'s kernel with its simulation at the edges of its input ranges."""
    kernel, sim = node.target, _SIM[node.target]
    if kernel is fxq.quantize_dequantize.default:
        cases = _qdq_edges(args)
    elif kernel is fxq.conv2d_int8.default:
        cases = _conv_edges(args)
    elif kernel is fxq.linear_wq_gpu.default:
        cases = _wq_edges(args)
    else:
        cases = _linear_edges(args, kernel in _DYNAMIC_LINEARS)
    worst = None
    for what, x in cases:
        x = x.to(args[0].device, args[0].dtype if kernel is fxq.linear_wq_gpu.default else torch.float32)
        if kernel in _STATIC_LINEARS + _DYNAMIC_LINEARS + (fxq.linear_wq_gpu.default,):
            x = x.reshape(*([1] * (args[0].dim() - 2)), *x.shape) if args[0].dim() > 2 else x
        edge = (x, *args[1:])
        out, ref = kernel(*edge), sim(*edge)
        err, allowed = float((out - ref).abs().max()), _allowed(kernel, edge, ref)
        if worst is None or err - allowed > worst[0] - worst[1]:
            worst = (err, allowed, what)
    return worst


def check_layers(gm: fx.GraphModule, ctx: PassContext, choose: Any = None) -> float:
    """Run each int8 kernel next to its simulated formula, on the inputs and at the edges of its ranges.

    With ``choose`` (an :class:`EngineChooser`), each layer's engine is picked on its first call and
    written into the graph; everything after that call checks the chosen engine.

    The example inputs (and ``ctx.verify_inputs``) give each layer its real arguments; each
    layer is then also run on synthetic inputs whose codes all sit at their extremes, both
    signs, aligned with the weights' signs, and beyond the calibrated range, where a kernel
    that saturates its accumulators shows. Raises ``PassError`` naming the first layer whose
    kernel disagrees beyond float rounding (one output step for requantizing convs); returns
    the largest error seen.
    """
    from fxopt.errors import PassError
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SIM]
    if not nodes:
        return 0.0
    errors: dict[str, tuple[float, float, str]] = {}
    checked = {n: _Checked(n, errors, choose) for n in nodes}
    for n in nodes:
        n.target = checked[n]
    gm.recompile()
    try:
        for args, kwargs in [(ctx.args, ctx.kwargs)] + list(getattr(ctx, "verify_inputs", None) or []):
            ctx.run(gm, args, kwargs)
    finally:
        for n in nodes:
            n.target = checked[n].kernel
            if checked[n].engine is not None:
                n.args = (*n.args[:-1], checked[n].engine)
        gm.recompile()
    with torch.no_grad():
        for n in nodes:
            if checked[n].args is not None:
                edge = _edge_errors(n, checked[n].args)
                if edge is not None and (edge[0] > edge[1] or n.name not in errors):
                    errors[n.name] = max(errors.get(n.name, edge), edge, key=lambda e: e[0] - e[1])
    for name, (err, allowed, what) in errors.items():
        if err > allowed:
            raise PassError("lower-quant", f"the kernel of '{name}' differs from its simulated QDQ form by "
                            f"{err:.3g} (allowed {allowed:.3g}) {what}",
                            remedy=f"keep the layer simulated: insert-qdq(skip=['{name}']) (or its module path), "
                            "and report the case with `fxopt info` output")
    return max((e for e, _, _ in errors.values()), default=0.0)


def _summarize(kernels: dict[str, str]) -> str:
    """'fbgemm 7-bit x12, onednn 8-bit x2': how many int8 layers run on which engine and code width."""
    counts: dict[str, int] = {}
    for k in kernels.values():
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


"""``lower-quant``: replace the simulated QDQ patterns with real integer CPU kernels.

Matches what ``insert-qdq`` wrote and emits the ``torch.ops.fxopt`` kernels of
:mod:`fxopt.kernels.cpu_quant`:

==========================================================  =============================
pattern                                                     kernel
==========================================================  =============================
``linear(dq(q(x, s, z)), dq(W8), b)``, int8 per channel      ``linear_int8`` (fbgemm)
``linear(dq(q(x, dynamic_scale(x))), dq(W8), b)``            ``linear_int8_dynamic``
``q(relu?(conv2d(dq(q(x)), dq(W8), b)))`` then ``dq``        ``conv2d_int8`` (fbgemm)
``linear(x, dq(Wq), b)`` (weight-only int8/int4)             ``linear_wq``
``conv2d(x, dq(W8), b)`` (weight-only)                       ``conv2d_wq``
``embedding(dq(Wq), ids)``                                   ``embedding_wq``
==========================================================  =============================

4-bit weights are packed two per byte here. A pattern whose specs the kernels do not
support (asymmetric int8 weights for fbgemm, say) stays simulated and is listed in the
record as ``kept``. The lowered model agrees with the simulated one to integer rounding
(``check_layers`` runs every int8 kernel next to its simulated formula on the example
inputs and fails the pass, which the manager rolls back, when they differ beyond float
rounding; end to end, rare rounding flips grow through deep nets, so the manager
records the output change instead of bounding it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import fxopt.kernels.cpu_quant  # noqa: F401  (registers the kernels)
from fxopt.kernels import cpu_isa
import fxopt.quant.qops  # noqa: F401  (registers quantize/dequantize)
from fxopt.ir.dialect import RELU_OPS, arg, aten
from fxopt.kernels.cpu_quant import REFERENCES, int8_layer_plans, pack_int4, weight_bits
from fxopt.quant.qspec import QSpec
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["LowerQuantPass"]

fxq = torch.ops.fxopt
_Q, _DQ, _DYN = fxq.quantize.default, fxq.dequantize.default, fxq.dynamic_scale.default


@dataclass
class _W:
    q: fx.Node
    scale: fx.Node
    zp: fx.Node
    group_size: int
    symmetric: bool


def _weight(gm: fx.GraphModule, node: Any) -> _W | None:
    """``dq(get_attr q, get_attr s, get_attr z, g)`` of a stored weight."""
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q, s, z, g = node.args
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (q, s, z)):
        return None
    qt, zt = attr_tensor(gm, q), attr_tensor(gm, z)
    if qt is None or zt is None or qt.dtype != torch.int8:
        return None
    return _W(q, s, z, g, bool((zt == 0).all()))


def _bits_from_meta(user: fx.Node) -> int:
    """4 for an int4 (or narrower) weight spec recorded by insert-qdq, else 8."""
    spec = (user.meta.get("fxopt_quant") or {}).get("weight")
    if not spec:
        return 8
    q = QSpec.parse(spec)
    return 4 if q.signed and q.bits <= 4 else 8


def _activation(gm: fx.GraphModule, node: Any) -> tuple[str, fx.Node, Any] | None:
    """('static', x, (scale, zp, qmax)) or ('dynamic', x, qmax) for ``dq(q(x, ...))``.

    Static codes are unsigned ``0..qmax`` (qmax 255, or 127 where the CPU needs 7 bits);
    dynamic ones symmetric ``-qmax..qmax`` with a run-time per-row scale.
    """
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q = node.args[0]
    if not (isinstance(q, fx.Node) and q.target is _Q):
        return None
    x, s, z, qmin, qmax, g = q.args
    if g:
        return None
    if isinstance(s, fx.Node) and s.target is _DYN:
        if qmin == -qmax and 1 <= qmax <= 127 and s.args[1] == qmax and s.args[0] is x:
            return "dynamic", x, qmax
        return None
    st, zt = attr_tensor(gm, s), attr_tensor(gm, z)
    if st is None or zt is None or st.numel() != 1 or qmin != 0 or not 1 <= qmax <= 255:
        return None
    return "static", x, (float(st), int(zt), int(qmax))


def _bits(qmax: int, dynamic: bool) -> int:
    return 8 if qmax > (63 if dynamic else 127) else 7


def _replace(gm: fx.GraphModule, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    copy_meta(new, old)
    for k in ("fxopt_quant",):
        if k in old.meta:
            new.meta[k] = old.meta[k]
    old.replace_all_uses_with(new)
    name = old.name
    gm.graph.erase_node(old)
    new._rename(name)  # the kernel keeps the layer's node name (fxopt.diff shows it as retyped)
    return new


def _pack4(gm: fx.GraphModule, w: _W) -> fx.Node:
    """A packed uint8 copy of an int4 weight stored as int8 (cached per weight)."""
    packed_name = str(w.q.target) + "_packed"
    owner, _, attr = packed_name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if not hasattr(mod, attr):
        mod.register_buffer(attr, pack_int4(attr_tensor(gm, w.q)))
    with gm.graph.inserting_before(w.q):
        return gm.graph.get_attr(packed_name)


@register_pass
class LowerQuantPass(Pass):
    """Swap simulated quantize/dequantize patterns for integer CPU kernels (see module docs)."""

    name = "lower-quant"
    # outputs move by rounding flips that grow through deep nets; each layer is checked instead
    preserves_semantics = False

    @dataclass(frozen=True)
    class Config:
        pack_int4: bool = True
        # which engine runs each int8 layer: "auto" times every engine that is exact for the layer's codes
        # on its example-input shapes and keeps the fastest; "fbgemm"/"onednn" where exact (else the other)
        engine: str = "auto"

        def __post_init__(self) -> None:
            if self.engine not in ("auto",) + cpu_isa.ENGINES:
                raise ValueError(f"lower-quant(engine=...) takes auto, {', '.join(cpu_isa.ENGINES)}; "
                                 f"got {self.engine!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        kept: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or getattr(node, "_erased", False):
                continue
            kind = self._lower(gm, node)
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
            elif node.meta.get("fxopt_quant") and node.target in (aten.linear.default, aten.conv2d.default,
                                                                   aten.embedding.default):
                kept.append(node.name)
        if not counts:
            return PassResult(False, info={"kept": kept})
        erase_dead(gm)
        propagate_meta(gm)
        chooser = EngineChooser(self.config.engine)
        worst = check_layers(gm, ctx, chooser)
        info: dict[str, Any] = {"lowered": counts, "kept": kept, "worst_layer_error": worst}
        if chooser.timings:
            info["engine_ms"] = chooser.timings
        kernels = layer_kernels(gm)
        if kernels:
            info["cpu"] = cpu_isa.cpu_info(probe=False).isa + (f" (plan forced: {cpu_isa.forced_isa()})"
                                                               if cpu_isa.forced_isa() else "")
            info["int8_kernels"] = _summarize(kernels)
            info["layer_kernels"] = kernels
        return PassResult(True, frozenset({"shapes"}), info)

    @staticmethod
    def _engine(node: fx.Node, kind: str, bits: int, shape: tuple, w_q: torch.Tensor) -> str:
        """The first engine exact for ``bits``-wide codes and these weights here (``check_layers`` may pick a
        faster exact one)."""
        return cpu_isa.plan(kind, bits, "", shape, weight_bits(w_q)) or "fbgemm"

    def _wargs(self, gm: fx.GraphModule, w: _W, bits: int) -> tuple:
        q = _pack4(gm, w) if bits == 4 and self.config.pack_int4 else w.q
        return q, w.scale, w.zp, w.group_size, 4 if bits == 4 and self.config.pack_int4 else 8

    def _lower(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        t = node.target
        bits = _bits_from_meta(node)
        if t is aten.embedding.default:
            w = _weight(gm, node.args[0])
            if w is None:
                return None  # (padding_idx and the other options only matter for gradients)
            q, s, z, g, b = self._wargs(gm, w, bits)
            _replace(gm, node, fxq.embedding_wq.default, (q, node.args[1], s, z, g, b))
            return f"embedding_int{b}"
        if t is aten.linear.default:
            x_node, w_node, bias = node.args[0], node.args[1], arg(node, 2, "bias")
            w = _weight(gm, w_node)
            if w is None:
                return None
            act = _activation(gm, x_node)
            int8_channel = bits == 8 and w.symmetric and w.group_size == 0
            shape = tuple(attr_tensor(gm, w.q).shape)
            if act is not None and act[0] == "dynamic" and int8_channel:
                qmax = act[2]
                engine = self._engine(node, "linear", _bits(qmax, True), shape, attr_tensor(gm, w.q))
                _replace(gm, node, fxq.linear_int8_dynamic.default, (act[1], w.q, w.scale, bias, qmax, engine))
                return "linear_int8_dynamic"
            if act is not None and act[0] == "static" and int8_channel:
                (s, z, qmax) = act[2]
                engine = self._engine(node, "linear", _bits(qmax, False), shape, attr_tensor(gm, w.q))
                _replace(gm, node, fxq.linear_int8.default, (act[1], w.q, w.scale, bias, s, z, qmax, engine))
                return "linear_int8"
            if act is None and not (isinstance(x_node, fx.Node) and x_node.target is _DQ):
                q, s, z, g, b = self._wargs(gm, w, bits)
                _replace(gm, node, fxq.linear_wq.default, (x_node, q, s, z, bias, g, b))
                return f"linear_int{b}_weight"
            return None
        if t is aten.conv2d.default:
            return self._conv(gm, node)
        return None

    def _conv(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        x_node, w_node = node.args[0], node.args[1]
        bias = arg(node, 2, "bias")
        stride, padding = list(_pair(arg(node, 3, "stride", 1))), arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            return None
        padding, dilation = list(_pair(padding)), list(_pair(arg(node, 5, "dilation", 1)))
        groups = arg(node, 6, "groups", 1)
        w = _weight(gm, w_node)
        if w is None or w.group_size:
            return None
        act = _activation(gm, x_node)
        if act is None and not (isinstance(x_node, fx.Node) and x_node.target is _DQ):
            _replace(gm, node, fxq.conv2d_wq.default, (x_node, w.q, w.scale, w.zp, bias, stride, padding,
                                                      dilation, groups))
            return "conv2d_int8_weight"
        if act is None or act[0] != "static" or not w.symmetric:
            return None
        out, relu = node, False
        if len(node.users) == 1:
            u = next(iter(node.users))
            if u.op == "call_function" and u.target in RELU_OPS:
                out, relu = u, True
        if len(out.users) != 1:
            return None
        q_out = next(iter(out.users))
        if q_out.target is not _Q or q_out.args[3] != 0 or q_out.args[5] != 0 or not 1 <= q_out.args[4] <= 255:
            return None
        so, zo = attr_tensor(gm, q_out.args[1]), attr_tensor(gm, q_out.args[2])
        dqs = list(q_out.users)
        if so is None or zo is None or so.numel() != 1 or not all(d.target is _DQ for d in dqs):
            return None
        (s, z, qmax) = act[2]
        shape = cpu_isa.conv_shape(attr_tensor(gm, w.q).shape, stride, padding, dilation, groups)
        engine = self._engine(node, "conv", _bits(qmax, False), shape, attr_tensor(gm, w.q))
        with gm.graph.inserting_before(q_out):
            new = gm.graph.call_function(fxq.conv2d_int8.default, (
                act[1], w.q, w.scale, bias, stride, padding, dilation, groups, s, z, float(so), int(zo), relu,
                qmax, int(q_out.args[4]), engine))
        copy_meta(new, node)
        new.meta["fxopt_quant"] = node.meta.get("fxopt_quant")
        # the kernel's output already lies on the output grid: q/dq of it is the identity. Quantized
        # consumers keep reading dq(q(new)) (so they match the static pattern); others read new.
        q_out.replace_input_with(out, new)
        for d in dqs:
            for u in list(d.users):
                if not (u.op == "call_function" and u.target in (aten.linear.default, aten.conv2d.default)
                        and u.args[0] is d and u.meta.get("fxopt_quant")):
                    u.replace_input_with(d, new)
        for dead in ([out] if relu else []) + [node]:
            gm.graph.erase_node(dead)
        new._rename(node.name)
        return "conv2d_int8_relu" if relu else "conv2d_int8"


# ---------------------------------------------------------------- engine choice
_INT8 = {fxq.linear_int8.default: "linear", fxq.linear_int8_dynamic.default: "linear", fxq.conv2d_int8.default: "conv"}
_TIMED: dict[tuple, dict[str, float]] = {}  # (kernel, argument shapes and options) -> engine -> ms, per process


def _exact_engines(kernel: Any, args: tuple) -> list[str]:
    from fxopt.kernels.cpu_quant import _plan_key
    kind, bits, shape = _plan_key(kernel, list(args), tuple(args[1].shape))
    wb = weight_bits(args[1])
    return [e for e in cpu_isa.ENGINES if cpu_isa.exact_bits(e, kind, shape, wb) >= bits]


def _time_engines(kernel: Any, args: tuple, engines: list[str]) -> dict[str, float]:
    """Median milliseconds of ``kernel`` on ``args`` with each engine (interleaved rounds, warm caches)."""
    import time
    key = (kernel, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else tuple(a) if isinstance(a, list) else a
                         for a in args[:-1]), tuple(engines))
    if key in _TIMED:
        return _TIMED[key]
    times: dict[str, list[float]] = {e: [] for e in engines}
    with torch.no_grad():
        for e in engines:  # warm-up: packs the weights, faults in the buffers
            kernel(*args[:-1], e)
        rounds, spent = 0, 0.0
        while rounds < 7 and (rounds < 3 or spent < 0.2):  # 3-7 rounds, about 0.2 s at most per layer shape
            for e in engines:
                t0 = time.perf_counter()
                kernel(*args[:-1], e)
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

    def __init__(self, engine: str = "auto"):
        self.engine, self.timings = engine, {}

    def __call__(self, name: str, kernel: Any, args: tuple) -> str | None:
        cands = _exact_engines(kernel, args)
        if self.engine != "auto" and self.engine in cands:
            return self.engine
        if len(cands) > 1:
            ms = _time_engines(kernel, args, cands)
            self.timings[name] = {e: round(v, 3) for e, v in ms.items()}
            return min(cands, key=ms.__getitem__)
        return cands[0] if cands else None  # None: no exact engine, the kernel's own fallback decides


def layer_kernels(gm: fx.GraphModule) -> dict[str, str]:
    """layer -> "engine aNwM" (or "exact fallback aNwM") for every int8 kernel of ``gm``, as it runs here."""
    return {name: f"{engine or 'exact fallback'} a{bits}w{wb}"
            for name, (engine, bits, wb) in int8_layer_plans(gm).items()}


# ---------------------------------------------------------------- per-layer check
_SIM = dict(REFERENCES)  # kernel -> its simulated QDQ formula (tests swap entries to fake a wrong kernel)


def _allowed(kernel: Any, args: tuple, ref: torch.Tensor) -> float:
    # a static conv requantizes its output: one step of the output scale is rounding
    step = 2.01 * args[10] if kernel is fxq.conv2d_int8.default else 0.0
    return 1e-4 * float(ref.abs().max()) + 1e-5 + step


class _Checked:
    """Stands in for a kernel during the check: runs it and its simulated formula on the same inputs."""

    def __init__(self, node: fx.Node, errors: dict, choose: Any = None):
        self.kernel, self.sim, self.node, self.errors = node.target, _SIM[node.target], node, errors
        self.__name__ = f"check_{node.name}"
        self.args: tuple | None = None
        self.choose, self.engine = choose, None

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.choose is not None and self.engine is None:  # first call: pick the engine on these arguments
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
    signs = (w[: min(4, w.shape[0])].float() >= 0)
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


def _edge_errors(node: fx.Node, args: tuple) -> tuple[float, float, str] | None:
    """The worst disagreement of ``node``'s kernel with its simulation at the edges of its input ranges."""
    kernel, sim = node.target, _SIM[node.target]
    if kernel is fxq.conv2d_int8.default:
        cases = _conv_edges(args)
    else:
        cases = _linear_edges(args, kernel is fxq.linear_int8_dynamic.default)
    worst = None
    for what, x in cases:
        if kernel is not fxq.conv2d_int8.default:
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


def _pair(v: Any) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == 2 else (v[0], v[0])
    return (v, v)

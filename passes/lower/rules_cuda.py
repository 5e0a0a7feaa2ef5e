"""The CUDA rows of the lowering table, and the keep-only-where-faster plan of each lowered layer.

The same QDQ and sparsity graphs the CPU rules consume lower here when the graph lives on a
CUDA device (or ``lower-quant(target=cuda)`` / ``lower-sparse(target=cuda)`` asks for it):

=======================  ======  ================================================  ===============================
rule                     device  pattern                                           kernel
=======================  ======  ================================================  ===============================
linear_int8_gpu          cuda    ``act?(linear(dq(q(x, s, z)), dq(W8), b))``       ``fxopt::linear_int8_gpu``
linear_int8_dynamic_gpu  cuda    ``act?(linear(dq(q(x, dyn(x))), dq(W8), b))``     ``fxopt::linear_int8_dynamic_gpu``
linear_wq_gpu            cuda    ``linear(x, dq(Wq), b)``                          ``fxopt::linear_wq_gpu``
embedding_wq             cpu,    ``embedding(dq(Wq), ids)``                        ``fxopt::embedding_wq``
                         cuda
linear_24_gpu            cuda    ``linear(x, W, b)``, W 2:4 sparse                 ``fxopt::linear_24_gpu``
linear_bsr_gpu           cuda    ``linear(x, W, b)``, W mostly zero blocks         ``fxopt::linear_bsr_gpu``
=======================  ======  ================================================  ===============================

``act?`` is an only-user ReLU or exact GELU, fused into the GEMM's epilogue.

**Keep a kernel only where it is faster.** With ``decline="slower"`` (the default on CUDA) each
layer is timed on the device, per row-count bucket (M = 1, 16, 128 and 2048 rows of its own K
and dtype, CUDA events, medians): the Triton kernel, torch's cuBLAS int8 GEMM with the same
epilogue where it applies (``int_mm``; M > 16, sizes multiples of 8), torch's semi-structured
sparse GEMM for 2:4 (``torch24``), against the layer's float form (the dequantized or dense weight
in the activation dtype and torch's ``linear``). The fastest wins each bucket; the plan (one
choice per bucket) goes into the op's ``plan`` argument and, with every timing, into the node's
``fxopt_gpu_plan`` meta, which the pass records (``info["gpu_plans"]``). A layer whose float
form wins every bucket is declined: it stays a float ``linear`` of its dequantized weights and
the record says why. ``decline="never"`` plans the Triton kernel everywhere without timing
(what the CPU tests use under Triton's interpreter). Timings of one layer shape are reused for
every layer of that shape in a process.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

import fxopt.kernels.triton_int8  # noqa: F401  (registers the GPU int8 ops)
import fxopt.kernels.triton_sparse  # noqa: F401  (registers the GPU sparse ops)
import fxopt.kernels.triton_wq  # noqa: F401  (registers the GPU weight-only op)
from fxopt.ir.dialect import RELU_OPS, aten
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta
from fxopt.kernels.triton_common import BUCKET_ROWS, BUCKETS, time_call
from fxopt.kernels.triton_sparse import compress_24, is_24, to_bsr
from fxopt.passes.lower import rules
from fxopt.passes.lower.rules import LoweringRule, QuantMatch, SparseMatch, register_lowering
from fxopt.quant.annotation import QuantAnnotation
from fxopt.quant.qspec import dequantize

__all__ = ["plan_layer", "GPU_KERNELS", "gpu_plans", "declined_gpu"]

fxq = torch.ops.fxopt
_GELU = aten.gelu.default

#: the GPU ops these rules emit
GPU_KERNELS = {fxq.linear_int8_gpu.default, fxq.linear_int8_dynamic_gpu.default, fxq.linear_wq_gpu.default,
               fxq.linear_24_gpu.default, fxq.linear_bsr_gpu.default}

_PLANS: dict[tuple, tuple[str, dict]] = {}  # (kind, N, K, dtype, options) -> (plan, timings), per process


def _measure(config: Any, device: torch.device) -> bool:
    decline = getattr(config, "decline", "auto")
    return decline == "slower" or (decline == "auto" and device.type == "cuda")


def _time(name: str, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """Median ms of ``fn(x)`` on the device (the tests put a fake clock here)."""
    return time_call(lambda: fn(x))


def plan_layer(key: tuple, k: int, dtype: torch.dtype, device: torch.device,
               candidates: dict[str, Callable[[torch.Tensor], Any]]) -> tuple[str, dict]:
    """Time each candidate (``name -> fn(x)``, ``float`` among them) on ``x`` of each bucket's row count
    and ``k`` columns; -> (the plan: the fastest per bucket, comma-separated; bucket -> name -> ms)."""
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    choices, timings = [], {}
    g = torch.Generator(device=device).manual_seed(0)
    for top, rows in zip(BUCKETS, BUCKET_ROWS):
        x = torch.randn(rows, k, generator=g, device=device, dtype=torch.float32).to(dtype)
        ms = {}
        label = f"M<={top}" if top is not None else f"M>{BUCKETS[-2]}"
        for name, fn in candidates.items():
            try:
                ms[name] = round(_time(name, fn, x), 4)
            except Exception as e:  # a candidate that does not run for this shape (int_mm's size rules) is no
                # choice for it; the record says why
                timings.setdefault("skipped", {})[f"{label} {name}"] = f"{type(e).__name__}: {e}"[:200]
        timings[label] = ms
        choices.append(min(ms, key=ms.__getitem__) if ms else "float")
    _PLANS[key] = (",".join(choices), timings)
    return _PLANS[key]


def _fusable_activation(node: fx.Node) -> tuple[fx.Node | None, str]:
    """An only-user ReLU or exact GELU of ``node`` (fused into the epilogue), else (None, 'none')."""
    if len(node.users) != 1:
        return None, "none"
    u = next(iter(node.users))
    if u.op != "call_function" or u.args[0] is not node:
        return None, "none"
    if u.target in RELU_OPS:
        return u, "relu"
    if u.target is _GELU and u.kwargs.get("approximate", u.args[1] if len(u.args) > 1 else "none") == "none":
        return u, "gelu"
    return None, "none"


def _x_dtype(node: fx.Node) -> torch.dtype:
    v = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def _emit(gm: fx.GraphModule, old: fx.Node, last: fx.Node, target: Any, args: tuple, meta: dict | None) -> fx.Node:
    """Insert ``target(*args)`` for the layer ``old`` (and its fused activation ``last``), rewire, erase."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    copy_meta(new, old)
    QuantAnnotation.carry(new, old)
    name = old.name
    if meta:
        new.meta["fxopt_gpu_plan"] = {**meta, "layer": name}
    last.replace_all_uses_with(new)
    for dead in ([last] if last is not old else []) + [old]:
        gm.graph.erase_node(dead)
    new._rename(name)
    return new


def _float_linear(gm: fx.GraphModule, node: fx.Node, last: fx.Node, weight: torch.Tensor, bias: Any,
                  activation: str, meta: dict) -> str:
    """Decline: the layer becomes a float linear of ``weight`` (stored), then its activation."""
    from fxopt.ir.rewrite_utils import add_param
    w = add_param(gm, f"{node.name}_weight_float", weight, node, requires_grad=False, buffer=True)
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(aten.linear.default, (node.args[0], w, bias))
        out = lin if activation == "none" else gm.graph.call_function(
            aten.relu.default if activation == "relu" else _GELU, (lin,))
    for n in {lin, out}:
        copy_meta(n, node)
    name = node.name
    lin.meta["fxopt_gpu_plan"] = {**meta, "layer": name,
                                  "declined": "its float form was timed fastest at every row count"}
    last.replace_all_uses_with(out)
    for dead in ([last] if last is not node else []) + [node]:
        gm.graph.erase_node(dead)
    lin._rename(name)
    return "declined_gpu"


# ---------------------------------------------------------------- int8 (W8A8)
def _build_int8(m: QuantMatch, rule: LoweringRule) -> str:
    gm, node = m.gm, m.node
    last, activation = _fusable_activation(node)
    last = last or node
    w_q, w_scale = attr_tensor(gm, m.w.q), attr_tensor(gm, m.w.scale)
    bias = attr_tensor(gm, m.bias) if isinstance(m.bias, fx.Node) else None
    dynamic = m.kind("dynamic")
    dtype = _x_dtype(node)
    head = (m.act[1], m.w.q, m.w.scale, m.bias)
    opts = (m.act[2], activation) if dynamic else (*m.act[2], activation)
    meta = None
    if _measure(m.config, w_q.device):
        n, k = w_q.shape
        w_float = (w_q.float() * w_scale.reshape(-1, 1).float()).to(dtype)
        kernel = rule.kernel
        cands = {"triton": lambda x: kernel(x, w_q, w_scale, bias, *opts, "triton"),
                 "int_mm": lambda x: kernel(x, w_q, w_scale, bias, *opts, "int_mm") if x.shape[0] > 16
                 else _no("torch._int_mm needs more than 16 rows"),
                 "float": lambda x: _act(F.linear(x, w_float, None if bias is None else bias.to(dtype)), activation)}
        if not (n % 8 == 0 and k % 8 == 0):
            del cands["int_mm"]
        plan, ms = plan_layer((rule.name, n, k, dtype, activation, bias is not None), k, dtype, w_q.device, cands)
        meta = {"plan": plan, "ms": ms}
        if set(plan.split(",")) == {"float"}:
            return _float_linear(gm, node, last, w_float, m.bias, activation, meta)
    else:
        plan = "triton"
    _emit(gm, node, last, rule.kernel, (*head, *opts, plan), meta)
    return rule.name + ("_" + activation if activation != "none" else "")


def _no(why: str) -> None:
    raise ValueError(why)  # plan_layer leaves a candidate that cannot run a bucket out of it


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(y) if activation == "relu" else F.gelu(y) if activation == "gelu" else y


# ---------------------------------------------------------------- weight-only
def _build_wq(m: QuantMatch, rule: LoweringRule) -> str:
    gm, node = m.gm, m.node
    q, s, z, g, bits = rules._wargs(m)
    w_q, w_scale, w_zp = attr_tensor(gm, q), attr_tensor(gm, s), attr_tensor(gm, z)
    bias = attr_tensor(gm, m.bias) if isinstance(m.bias, fx.Node) else None
    dtype = _x_dtype(node)
    meta, plan = None, "triton"
    if _measure(m.config, w_q.device):
        n = w_q.shape[0]
        codes = attr_tensor(gm, m.w.q)
        k = codes.shape[1]
        w_float = dequantize(codes, w_scale, w_zp, g).to(dtype)
        kernel = rule.kernel
        cands = {"triton": lambda x: kernel(x, w_q, w_scale, w_zp, bias, g, bits, "triton"),
                 "float": lambda x: F.linear(x, w_float, None if bias is None else bias.to(dtype))}
        plan, ms = plan_layer((rule.name, n, k, bits, g, dtype, bias is not None), k, dtype, w_q.device, cands)
        meta = {"plan": plan, "ms": ms}
        if set(plan.split(",")) == {"float"}:
            return _float_linear(gm, node, node, w_float, m.bias, "none", meta)
    _emit(gm, node, node, rule.kernel, (m.x, q, s, z, m.bias, g, bits, plan), meta)
    return f"linear_int{bits}_weight_gpu"


def _int8_gpu(m: QuantMatch) -> bool:
    return m.conv is None and m.node.target is aten.linear.default and m.act is not None and m.int8_channel


def _weight_only_linear(m: QuantMatch) -> bool:
    if m.node.target is not aten.linear.default or m.act is not None or m.x_is_dq:
        return False
    k = attr_tensor(m.gm, m.w.q).shape[1]
    return not m.int4 or (m.pack_int4 and k % 2 == 0)


# ---------------------------------------------------------------- sparse
def _register(gm: fx.GraphModule, node: fx.Node, parts: dict[str, torch.Tensor]) -> list[fx.Node]:
    owner = str(node.args[1].target).rpartition(".")[0]
    mod = gm.get_submodule(owner) if owner else gm
    out = []
    for suffix, t in parts.items():
        attr, i = f"weight_{suffix}", 1
        while hasattr(mod, attr):
            attr, i = f"weight_{suffix}_{i}", i + 1
        mod.register_buffer(attr, t)
        with gm.graph.inserting_before(node):
            out.append(gm.graph.get_attr(f"{owner}.{attr}" if owner else attr))
    return out


def _sparse_plan(m: SparseMatch, rule: LoweringRule, extra: dict) -> tuple[str, dict | None]:
    w = m.weight
    if not _measure(m.config, w.device):
        return "triton", None
    n, k = w.shape
    bias = attr_tensor(m.gm, m.node.args[2]) if len(m.node.args) > 2 and isinstance(m.node.args[2], fx.Node) \
        else None
    cands = {name: (lambda fn: lambda x: fn(x, bias))(fn) for name, fn in extra.items()}
    cands["float"] = lambda x: F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    plan, ms = plan_layer((rule.name, n, k, w.dtype, m.density), k, w.dtype, w.device, cands)
    return plan, {"plan": plan, "ms": ms}


def _build_24(m: SparseMatch, rule: LoweringRule) -> str:
    values, meta_t = compress_24(m.weight)
    kernel = rule.kernel
    extra = {"triton": lambda x, b: kernel(x, values, meta_t, b, "triton")}
    if m.weight.is_cuda and m.weight.dtype in (torch.float16, torch.bfloat16):
        extra["torch24"] = lambda x, b: kernel(x, values, meta_t, b, "torch24")
    plan, meta = _sparse_plan(m, rule, extra)
    if plan.replace("float", "").strip(",") == "":
        m.node.meta["fxopt_gpu_plan"] = {**meta, "declined": "the dense form was timed fastest at every row count"}
        return ""
    v, mt = _register(m.gm, m.node, {"24_values": values, "24_meta": meta_t})
    bias = m.node.args[2] if len(m.node.args) > 2 else None
    new = _emit(m.gm, m.node, m.node, kernel, (m.node.args[0], v, mt, bias, plan), meta)
    new.meta["fxopt_sparsity"] = {"pattern": "2:4", "density": m.density}
    return rule.name


def _build_bsr(m: SparseMatch, rule: LoweringRule) -> str:
    crow, col, blocks = to_bsr(m.weight, _BSR_BLOCK)
    n = int(m.weight.shape[0])
    kernel = rule.kernel
    plan, meta = _sparse_plan(m, rule, {"triton": lambda x, b: kernel(x, crow, col, blocks, n, b, "triton")})
    if plan.replace("float", "").strip(",") == "":
        m.node.meta["fxopt_gpu_plan"] = {**meta, "declined": "the dense form was timed fastest at every row count"}
        return ""
    nodes = _register(m.gm, m.node, {"bsr_crow": crow, "bsr_col": col, "bsr_blocks": blocks})
    bias = m.node.args[2] if len(m.node.args) > 2 else None
    new = _emit(m.gm, m.node, m.node, kernel, (m.node.args[0], *nodes, n, bias, plan), meta)
    new.meta["fxopt_sparsity"] = {"pattern": f"bsr{_BSR_BLOCK}", "density": m.density}
    return rule.name


#: the block size of BSR weights (tensor-core tiles; the tests' odd shapes cross block edges)
_BSR_BLOCK = 32
#: lower to BSR when at most this fraction of the weight's blocks hold a non-zero
BSR_MAX_BLOCK_DENSITY = 0.5


def _sparse24(m: SparseMatch) -> bool:
    # a weight sparse enough for BSR is often 2:4 too (at most two non-zeros in any four): BSR skips whole
    # tiles, 2:4 only half of each, so the block-sparse rule takes those
    return m.weight.shape[1] % 4 == 0 and m.density <= 0.5 and is_24(m.weight) and not _block_sparse(m)


def _block_sparse(m: SparseMatch) -> bool:
    max_density = getattr(m.config, "max_density", 0.1)
    if m.density > max_density:
        return False
    crow = to_bsr(m.weight, _BSR_BLOCK)[0]
    blocks = -(-m.weight.shape[0] // _BSR_BLOCK) * -(-m.weight.shape[1] // _BSR_BLOCK)
    return int(crow[-1]) <= BSR_MAX_BLOCK_DENSITY * blocks


def gpu_plans(gm: fx.GraphModule) -> dict[str, dict]:
    """layer (its node's name before lowering) -> its plan and timings, for the layers the CUDA rules timed."""
    return {n.meta["fxopt_gpu_plan"].get("layer", n.name): {k: v for k, v in n.meta["fxopt_gpu_plan"].items()
                                                              if k != "layer"}
            for n in gm.graph.nodes if "fxopt_gpu_plan" in n.meta}


def declined_gpu(gm: fx.GraphModule) -> dict[str, str]:
    """layer -> why, for the layers the CUDA rules timed and left in float."""
    return {name: plan["declined"] for name, plan in gpu_plans(gm).items() if "declined" in plan}


_linear = aten.linear.default
for _rule in (
    LoweringRule("linear_int8_gpu", "quant", _linear, ("cuda",), fxq.linear_int8_gpu.default,
                 "act?(linear(dq(q(x, s, z)), dq(W8), b))", rules.match_quant, _build_int8,
                 lambda m: _int8_gpu(m) and m.kind("static")),
    LoweringRule("linear_int8_dynamic_gpu", "quant", _linear, ("cuda",), fxq.linear_int8_dynamic_gpu.default,
                 "act?(linear(dq(q(x, dyn(x))), dq(W8), b))", rules.match_quant, _build_int8,
                 lambda m: _int8_gpu(m) and m.kind("dynamic")),
    LoweringRule("linear_wq_gpu", "quant", _linear, ("cuda",), fxq.linear_wq_gpu.default,
                 "linear(x, dq(Wq), b)", rules.match_quant, _build_wq, _weight_only_linear),
    LoweringRule("linear_24_gpu", "sparse", _linear, ("cuda",), fxq.linear_24_gpu.default,
                 "linear(x, W, b), W 2:4 sparse", rules.match_sparse, _build_24, _sparse24),
    LoweringRule("linear_bsr_gpu", "sparse", _linear, ("cuda",), fxq.linear_bsr_gpu.default,
                 "linear(x, W, b), W mostly zero blocks", rules.match_sparse, _build_bsr, _block_sparse),
):
    register_lowering(_rule)
del _rule

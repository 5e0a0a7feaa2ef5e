"""``cast``: run the model in float16 or bfloat16, keeping float32 islands where precision matters.

Every floating-point op runs in ``dtype`` except the islands, which run in float32:

* softmax / log-softmax, layer/group/batch norm (their mean and variance),
* reductions (sum, mean, var, norms, cumsum, logsumexp ...),
* losses (cross entropy, NLL, MSE, BCE ...),
* anything the user keeps: ``keep`` holds op names (``gelu``) or module-path globs
  (``classifier``, ``encoder.layer.0.*``).

Casts are inserted only at island boundaries (one per tensor and dtype, shared by its
consumers). Weights whose consumers all run in ``dtype`` are stored in ``dtype`` (model
bytes halve); weights read by an island stay float32. Float outputs are cast back to
their original dtype, so callers see the dtypes they had. Integer and bool tensors and
explicit dtype conversions written in the model are left alone.

Constants that reach ``dtype`` are clamped to its finite range: a float32-minimum mask
value (``torch.finfo(torch.float32).min`` in Hugging Face attention masks, DeBERTa's
``masked_fill``) overflows bf16 and fp16, and an infinite mask turns a softmax row into
NaN. Python scalars of ops that run in ``dtype``, weights and buffers stored in
``dtype``, and the fill values of constant-building ops (``full``, ``scalar_tensor``)
read in ``dtype`` become the largest finite value of that sign; infinities written on
purpose stay infinite.

Only where it pays (``decline="slower"``, the default): every compute layer (linear, matmul, conv,
attention) is timed on the CPU at its example shapes in float32 and in ``dtype`` (median of a few
calls, once per distinct shape in a process); a layer slower in ``dtype`` stays float32, and the
history lists it with both timings (``info["declined"]``). On a CPU without bf16 instructions (no
AVX-512 BF16 / AMX) bf16 GEMMs are emulated and several times slower than fp32: there every layer
declines and the pass changes nothing, saying why. ``decline="never"``: cast anyway (the user insists;
a GPU graph is never timed here either).

Precision (``tests/passes/test_cast.py`` checks): on the MiniLM BERT, bf16 keeps the
sentence embeddings at cosine >= 0.99 to float32 and fp16 at >= 0.999. On CPU, fp16
matmuls are slow (no native fp16 GEMM here); bf16 runs through oneDNN.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, is_view_target, module_path, op_name
from fxopt.errors import PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta, erase_dead

__all__ = ["CastPass", "ISLAND_OPS"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16}

#: op names (``fxopt.ir.dialect.op_name``) that always run in float32
ISLAND_OPS = frozenset({
    "_softmax", "softmax", "_log_softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm",
    "native_group_norm", "rms_norm", "_fused_rms_norm",
    "sum", "mean", "var", "std", "var_mean", "std_mean", "cumsum", "cumprod", "prod", "logsumexp",
    "norm", "linalg_vector_norm", "_euclidean_dist", "cdist",
    "cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss2d_forward", "mse_loss", "l1_loss",
    "smooth_l1_loss", "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
})

# ops whose output dtype is fixed by an argument, not by their inputs
_EXPLICIT = {aten._to_copy.default, aten.full.default, aten.arange.default, aten.arange.start,
             aten.arange.start_step, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
             aten.scalar_tensor.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
             aten.lift_fresh_copy.default}


def _is_float(val: object) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _clamp_scalars(args: object, low: torch.dtype) -> object:
    """Python floats beyond ``low``'s finite range, clamped to it (infinities stay)."""
    fmax = torch.finfo(low).max

    def clamp(a: object) -> object:
        if type(a) is float and math.isfinite(a) and abs(a) > fmax:
            return math.copysign(fmax, a)
        return a
    return torch.fx.node.map_aggregate(args, clamp)


def _clamp_tensor(t: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(low).max
    return torch.where(torch.isfinite(t), t.clamp(-fmax, fmax), t)


@register_pass
class CastPass(Pass):
    """Run in fp16/bf16 with float32 islands (softmax, norms, reductions, losses, a keep-list)."""

    name = "cast"
    preserves_semantics = False  # lower precision by design: the manager records the change

    @dataclass(frozen=True)
    class Config:
        dtype: str = "bf16"
        keep: tuple = ()
        decline: str = "slower"

        def __post_init__(self) -> None:
            object.__setattr__(self, "keep", (self.keep,) if isinstance(self.keep, str) else tuple(self.keep))
            if self.dtype not in _DTYPES:
                raise PipelineError(f"cast: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
            if self.decline not in ("slower", "never"):
                raise PipelineError(f"cast: decline must be 'slower' (keep float32 where the low precision is "
                                    f"measured slower) or 'never', got {self.decline!r}")

    def _wants_fp32(self, node: fx.Node) -> bool:
        name = op_name(node)
        if name in ISLAND_OPS or name in self.config.keep:
            return True
        t = node.target
        if isinstance(t, torch._ops.OpOverload) and torch.Tag.reduction in t.tags and \
                name not in ("amax", "amin", "argmax", "argmin", "max", "min", "any", "all"):
            return True
        path = module_path(node)
        return any(fnmatch.fnmatchcase(path, k) or fnmatch.fnmatchcase(node.name, k) for k in self.config.keep)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        low = _DTYPES[self.config.dtype]
        g = gm.graph
        for n in list(g.nodes):  # export's dtype assertions would reject the new dtypes
            if n.op == "call_function" and n.target is aten._assert_tensor_metadata.default and not n.users:
                g.erase_node(n)
        want: dict[fx.Node, torch.dtype] = {}
        for n in g.nodes:
            if n.op == "call_function" and n.target not in _EXPLICIT and not is_view_target(n.target):
                want[n] = torch.float32 if self._wants_fp32(n) else low
        declined, timed = {}, {}
        if self.config.decline == "slower" and _on_cpu(gm, ctx):
            for n in [n for n, d in want.items() if d == low and n.target in _COMPUTE]:
                ms = _time_layer(gm, n, low)
                if ms is None:
                    continue
                timed[n.name] = ms
                if ms[1] > 1.1 * ms[0]:
                    declined[n.name] = (f"{str(low)[6:]} {ms[1]:.3g} ms vs float32 {ms[0]:.3g} ms at its example "
                                        f"shapes on this CPU")
                    want[n] = torch.float32
            if timed and len(declined) == len(timed):
                from fxopt.kernels.cpu_isa import cpu_info
                flags = set(cpu_info(probe=False).flags)
                has = sorted(flags & ({"avx512_bf16", "amx_bf16"} if low == torch.bfloat16 else
                                      {"avx512_fp16", "amx_fp16"}))
                return PassResult(False, info={
                    "why": f"every compute layer is slower in {str(low)[6:]} than in float32 on this CPU "
                           f"({'it has ' + ', '.join(has) if has else 'it has no ' + str(low)[6:] + ' instructions'}); "
                           "cast(decline=never) casts anyway", "declined": declined})
        # weights: stored in low precision when every reader runs in low precision
        dtype: dict[fx.Node, torch.dtype] = {}
        stored = 0
        for n in list(g.nodes):
            if n.op == "placeholder" and _is_float(n.meta.get("val")):
                dtype[n] = n.meta["val"].dtype
            elif n.op == "get_attr":
                t = attr_tensor(gm, n)
                if t is None or not t.is_floating_point():
                    continue
                readers = list(n.users)
                if t.dtype == torch.float32 and readers and all(want.get(u) == low for u in readers):
                    self._store(gm, str(n.target), t, low)
                    stored += 1
                    dtype[n] = low
                else:
                    dtype[n] = t.dtype
        casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        n_casts = n_clamped = 0

        def cast(x: fx.Node, to: torch.dtype, before: fx.Node) -> fx.Node:
            nonlocal n_casts, n_clamped
            key = (x, to)
            if to == low and x.op == "call_function" and x.target in _EXPLICIT and x.target is not aten._to_copy.default:
                clamped = _clamp_scalars(x.args, low), _clamp_scalars(x.kwargs, low)   # a constant fill
                if clamped != (x.args, x.kwargs):
                    x.args, x.kwargs = clamped
                    n_clamped += 1
            if key not in casts:
                with g.inserting_after(x):
                    c = g.call_function(aten._to_copy.default, (x,), {"dtype": to})
                copy_meta(c, before)
                casts[key] = c
                n_casts += 1
            return casts[key]

        for n in list(g.nodes):
            if n.op == "output":
                self._cast_outputs(n, dtype, cast)
                continue
            if n.op != "call_function":
                continue
            if n.target in _EXPLICIT or n.target is aten._to_copy.default:
                val = n.meta.get("val")
                if _is_float(val):
                    dtype[n] = val.dtype
                continue
            ins = [a for a in n.all_input_nodes if a in dtype]
            if is_view_target(n.target) or op_name(n) == "getitem":
                if ins:
                    dtype[n] = dtype[ins[0]]
                continue
            target = want.get(n, torch.float32)
            if target == low:
                clamped = _clamp_scalars(n.args, low), _clamp_scalars(n.kwargs, low)
                if clamped != (n.args, n.kwargs):
                    n.args, n.kwargs = clamped
                    n_clamped += 1
            for a in ins:
                if dtype[a] != target:
                    n.replace_input_with(a, cast(a, target, n))
            if _is_float(n.meta.get("val")) or isinstance(n.meta.get("val"), (tuple, list)):
                dtype[n] = target
        if not n_casts and not stored and not n_clamped:
            return PassResult(False, info={"declined": declined} if declined else {})
        for n in g.nodes:  # dtypes changed: recompute every fake value
            if n.op in ("call_function", "get_attr"):
                n.meta.pop("val", None)
                n.meta.pop("tensor_meta", None)
        erase_dead(gm)
        propagate_meta(gm)
        islands = sorted({op_name(n) for n, d in want.items() if d == torch.float32 and n in g.nodes})
        return PassResult(True, frozenset(), {"dtype": str(low).replace("torch.", ""), "casts": n_casts,
                                              "weights_stored_low": stored, "constants_clamped": n_clamped,
                                              "fp32_islands": islands, "declined": declined,
                                              "layer_ms": {k: [round(a, 4), round(b, 4)] for k, (a, b) in timed.items()}})

    @staticmethod
    def _store(gm: fx.GraphModule, target: str, t: torch.Tensor, low: torch.dtype) -> None:
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        old = getattr(mod, attr)
        new = _clamp_tensor(t.detach(), low).to(low)
        if isinstance(old, torch.nn.Parameter):
            setattr(mod, attr, torch.nn.Parameter(new, requires_grad=old.requires_grad))
        elif attr in mod._buffers:
            mod._buffers[attr] = new
        else:
            setattr(mod, attr, new)

    @staticmethod
    def _cast_outputs(out: fx.Node, dtype: dict, cast) -> None:
        def fix(a):
            if isinstance(a, fx.Node) and a in dtype:
                val = a.meta.get("val")
                orig = val.dtype if _is_float(val) else None
                if orig is not None and dtype[a] != orig:
                    return cast(a, orig, out)
            return a
        out.args = torch.fx.node.map_aggregate(out.args, fix)


_COMPUTE = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
            aten.baddbmm.default, aten.convolution.default, aten.conv1d.default, aten.conv2d.default,
            aten.scaled_dot_product_attention.default}
_LAYER_MS: dict[tuple, tuple[float, float]] = {}  # (op, shapes, dtype) -> (fp32 ms, low ms), per process


def _on_cpu(gm: fx.GraphModule, ctx: PassContext) -> bool:
    from fxopt.passes.lower.rules import graph_device
    return graph_device(gm, ctx.args) == "cpu"


def _concrete(val: object) -> object:
    """A random tensor like a fake value (symbolic sizes at their example values), or None."""
    if not isinstance(val, torch.Tensor):
        return None
    sizes = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            h = d.node.hint
            if h is None:
                return None
            d = int(h)
        sizes.append(int(d))
    if val.is_floating_point():
        return torch.randn(sizes, dtype=val.dtype)
    return torch.zeros(sizes, dtype=val.dtype)


def _time_layer(gm: fx.GraphModule, node: fx.Node, low: torch.dtype) -> tuple[float, float] | None:
    """(float32 ms, ``low`` ms) of ``node``'s op at its example shapes, or None when it cannot be run alone."""
    import time
    from fxopt.ir.meta import fake_values
    vals = fake_values(gm, [a for a in node.all_input_nodes if "val" not in a.meta])
    ok = True

    def arg(a: object) -> object:
        nonlocal ok
        if a.op == "get_attr":
            return attr_tensor(gm, a)
        v = _concrete(a.meta.get("val", vals.get(a)))
        ok = ok and v is not None
        return v
    args = torch.fx.node.map_arg(node.args, arg)
    kwargs = torch.fx.node.map_arg(node.kwargs, arg)
    if not ok:
        return None
    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    key = (node.target, tuple((tuple(t.shape), t.dtype) for t in flat), repr([a for a in node.args
                                                                                if not isinstance(a, fx.Node)]), low)
    if key in _LAYER_MS:
        return _LAYER_MS[key]

    def to(x: object, dt: torch.dtype) -> object:
        return x.detach().to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    out = []
    for dt in (torch.float32, low):
        a2 = torch.utils._pytree.tree_map(lambda x: to(x, dt), args)
        k2 = torch.utils._pytree.tree_map(lambda x: to(x, dt), kwargs)
        try:
            with torch.no_grad():
                node.target(*a2, **k2)
                times = []
                start = time.perf_counter()
                while len(times) < 7 and (len(times) < 3 or time.perf_counter() - start < 0.2):
                    t0 = time.perf_counter()
                    node.target(*a2, **k2)
                    times.append((time.perf_counter() - t0) * 1e3)
        except Exception:
            return None
        out.append(sorted(times)[len(times) // 2])
    _LAYER_MS[key] = (out[0], out[1])
    return _LAYER_MS[key]

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

        def __post_init__(self) -> None:
            object.__setattr__(self, "keep", (self.keep,) if isinstance(self.keep, str) else tuple(self.keep))
            if self.dtype not in _DTYPES:
                raise PipelineError(f"cast: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

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
            return PassResult(False)
        for n in g.nodes:  # dtypes changed: recompute every fake value
            if n.op in ("call_function", "get_attr"):
                n.meta.pop("val", None)
                n.meta.pop("tensor_meta", None)
        erase_dead(gm)
        propagate_meta(gm)
        islands = sorted({op_name(n) for n, d in want.items() if d == torch.float32 and n in g.nodes})
        return PassResult(True, frozenset(), {"dtype": str(low).replace("torch.", ""), "casts": n_casts,
                                              "weights_stored_low": stored, "constants_clamped": n_clamped,
                                              "fp32_islands": islands})

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

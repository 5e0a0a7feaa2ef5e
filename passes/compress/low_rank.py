"""``low-rank``: factor large linears into two thin ones by truncated SVD.

``W [out, in] ~= B [out, r] @ A [r, in]`` with ``A = sqrt(S_r) Vh_r`` and
``B = U_r sqrt(S_r)``; ``linear(x, W, b)`` becomes ``linear(linear(x, A), B, b)``.
The rank is the smallest that keeps ``energy`` of the squared singular values, or
the one that meets a parameter ``ratio`` (``ratio=0.5``: half the weights), rounded
up to a multiple of ``round_to``. A layer is skipped when the factorization would
not have fewer parameters and FLOPs than the original (``r * (in + out) >= in * out``),
when it is smaller than ``min_features``, or when its module matches ``skip``.

It changes the numerics (by design): the manager records the output error, and
``bench/rewrites.py`` shows the accuracy on real data at several ranks.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, is_linear, linear_args, module_path
from fxopt.errors import PipelineError
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, register_pass
from fxopt.ir.rewrite_utils import add_param, attr_tensor, copy_meta, erase_dead

__all__ = ["LowRankPass", "choose_rank"]


def choose_rank(s: torch.Tensor, out_f: int, in_f: int, energy: float | None, ratio: float | None,
                round_to: int) -> int:
    """Rank from singular values ``s`` by energy or parameter ratio, rounded up to ``round_to``."""
    if ratio is not None:
        r = int(ratio * out_f * in_f / (out_f + in_f))
    else:
        e = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        r = int(torch.searchsorted(e, torch.tensor(float(energy), dtype=torch.float64)).item()) + 1
    r = max(1, r)
    if round_to > 1:
        r = ((r + round_to - 1) // round_to) * round_to
    return min(r, len(s))


@register_pass
class LowRankPass(Pass):
    """Truncated-SVD factorization of large linears (see module docs)."""

    name = "low-rank"
    compresses = True
    preserves_semantics = False

    @dataclass(frozen=True)
    class Config:
        energy: float = 0.99
        ratio: float = None  # type: ignore[assignment]
        min_features: int = 64
        round_to: int = 8
        skip: tuple = ()

        def __post_init__(self) -> None:
            if self.ratio is not None and not 0 < self.ratio < 1:
                raise PipelineError(f"low-rank: ratio must be in (0, 1), got {self.ratio}")
            if not 0 < self.energy <= 1:
                raise PipelineError(f"low-rank: energy must be in (0, 1], got {self.energy}")
            if isinstance(self.skip, str):
                object.__setattr__(self, "skip", (self.skip,))

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = self.config
        factored, ranks = 0, {}
        for node in list(gm.graph.nodes):
            if not is_linear(node):
                continue
            x, w_node, b_node = linear_args(node)
            w = attr_tensor(gm, w_node)
            if w is None or w.dim() != 2 or not w.is_floating_point():
                continue
            out_f, in_f = w.shape
            path = module_path(node)
            if min(out_f, in_f) < c.min_features or any(fnmatch.fnmatch(path, p) for p in c.skip):
                continue
            with torch.no_grad():
                u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
                r = choose_rank(s, out_f, in_f, c.energy if c.ratio is None else None, c.ratio, c.round_to)
                if r * (in_f + out_f) >= in_f * out_f:
                    continue
                root = s[:r].sqrt()
                a = (root[:, None] * vh[:r]).to(w.dtype)
                b = (u[:, :r] * root[None, :]).to(w.dtype)
            base = w_node.name.rsplit("_weight", 1)[0]
            a_node = add_param(gm, f"{base}_lr_a", a, node, w.requires_grad)
            b_node2 = add_param(gm, f"{base}_lr_b", b, node, w.requires_grad)
            with gm.graph.inserting_before(node):
                h = gm.graph.call_function(aten.linear.default, (x, a_node, None))
                y = gm.graph.call_function(aten.linear.default, (h, b_node2, b_node))
            for n in (a_node, b_node2, h, y):
                copy_meta(n, node)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            factored += 1
            ranks[path or node.name] = f"{r}/{min(out_f, in_f)}"
        if factored:
            erase_dead(gm)
            propagate_meta(gm)
        info: dict = {"factored": factored, "ranks": ranks}
        if not factored:
            info["why"] = "no linear where a low-rank factorization at this energy/ratio has fewer parameters"
        return PassResult(bool(factored), frozenset(), info)

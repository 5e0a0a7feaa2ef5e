"""Channel rules for attention heads (the ``space`` phase of :mod:`fxopt.passes.analysis.dependency`).

A projection's output viewed as ``[..., H, D]`` becomes a space of H heads (its rows in blocks of D),
carried through transposes, softmax, ``matmul`` and ``sdpa`` (which join Q, K and V head by head) to
the merge back to ``H*D`` features. Grouped-query attention (``repeat_kv``'s ``unsqueeze -> expand ->
view``, or ``sdpa(enable_gqa=True)``) coarsens the query-head space so ``n_rep`` query heads are one
channel joined with their key/value head (:meth:`ChannelState.join_units`). Imported by
``dependency`` before its own rules, so these views are asked before the generic reshape rule.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten
from fxopt.ir.meta import size_expr

from fxopt.passes.analysis.channel_members import HeadCount, MergedSize, Produces, ViewSize
from fxopt.passes.analysis.channel_rules import ChannelRule, Channels, ChannelState, register_builtin
from fxopt.passes.analysis.channel_layouts import VIEWS

__all__ = ["HeadView", "HeadTranspose", "HeadMatmul", "HeadSoftmax", "ScaledDotProductAttention", "Unsqueeze",
           "Expand"]

_SDPA = aten.scaled_dot_product_attention.default
_val = ChannelState.val


# ---------------------------------------------------------------------------------- attention heads

def _head_input(node: fx.Node, st: ChannelState) -> tuple | None:
    """(src, channels, fake value of src, group) when ``node`` reads a space with its first argument."""
    if not isinstance(_val(node), torch.Tensor) or not node.args or node.args[0] not in st.space:
        return None
    src = node.args[0]
    ch = st.space[src]
    return src, ch, _val(src), st.group(ch.sid)


@register_builtin
class HeadView(ChannelRule):
    """Attention heads: ``[B, T, H*D] -view-> [B, T, H, D] -transpose-> sdpa -> ... -> [B, T, H*D]``.

    At the split, a projection's space (only its producer so far) becomes a space of H heads
    whose producer rows come in blocks of D; transposes move the head dim; sdpa joins Q, K and
    V head by head; the merge back gives a space with flatten factor D (its reader slices
    column blocks). Literal head counts in these views are recorded to be rewritten.
    """

    ops = tuple(VIEWS)

    def __call__(self, node, st):
        got = _head_input(node, st)
        if got is None or not isinstance(got[2], torch.Tensor):
            return False
        src, (sid, cdim, factor), x, g = got
        out = _val(node)
        xs, os_ = [size_expr(d) for d in x.shape], [size_expr(d) for d in out.shape]
        # split: [..., E] -> [..., H, D] on a projection's output
        # (the projection's rows become blocks of D: its norm too, LeViT's linear + BatchNorm)
        if factor == 1 and cdim == x.dim() - 1 and out.dim() == x.dim() + 1 and xs[:-1] == os_[:-2] and \
                isinstance(os_[-1], int) and isinstance(os_[-2], int) and os_[-1] > 1 and \
                os_[-2] * os_[-1] == g.size and not g.heads and g.of(Produces) and \
                st.coarsen(sid, os_[-1]) is None:
            g = st.group(sid)
            g.members.append(HeadCount(node, out.dim() - 2, os_[-2]))
            st.space[node] = Channels(sid, out.dim() - 2, 1)
            return True
        # same-shape view (a literal head count): carry it
        if xs == os_ and 0 < cdim < out.dim() - 1:
            g.members.append((HeadCount if g.heads else ViewSize)(node, cdim, g.size * factor, factor))
            st.space[node] = Channels(sid, cdim, factor)
            return True
        # a view that moves the head dim and keeps the dims after it (Swin's window split of attention scores)
        tail = xs[cdim:]
        j = out.dim() - len(tail)
        if factor == 1 and g.heads and 0 <= j and os_[j:] == tail and \
                all(isinstance(d, int) for d in tail) and node.args[1][j] == g.size and j != cdim:
            g.members.append(HeadCount(node, j, g.size))
            st.space[node] = Channels(sid, j, 1)
            return True
        # merge: [..., H, D] -> [..., H*D]
        if cdim == x.dim() - 2 and out.dim() == x.dim() - 1 and xs[:-2] == os_[:-1] and \
                isinstance(xs[-1], int):
            g.members.append(MergedSize(node, out.dim() - 1, xs[-1] * g.size * factor))
            st.space[node] = Channels(sid, out.dim() - 1, int(xs[-1]) * factor)
            return True
        # repeated key/value heads merged: [B, Hkv, n_rep, T, D] -> [B, Hkv * n_rep, T, D] (``repeat_kv``)
        if g.heads and cdim < x.dim() - 2 and out.dim() == x.dim() - 1 and xs[:cdim] == os_[:cdim] and \
                xs[cdim + 2:] == os_[cdim + 1:] and isinstance(xs[cdim + 1], int) and \
                isinstance(os_[cdim], int) and os_[cdim] == g.size * factor * xs[cdim + 1]:
            per = factor * xs[cdim + 1]
            g.members.append(HeadCount(node, cdim, os_[cdim], per))
            st.space[node] = Channels(sid, cdim, per)
            return True
        return False


@register_builtin
class HeadTranspose(ChannelRule):
    """Transposes of ``[B, H, T, D]``: ``k.transpose(-1, -2)`` keeps the head dim, others move it."""

    ops = (aten.transpose.int,)

    def __call__(self, node, st):
        got = _head_input(node, st)
        if got is None:
            return False
        src, (sid, cdim, factor), x, g = got
        d0, d1 = (d % x.dim() for d in node.args[1:3])
        if x.dim() != 4 and factor == 1 and not g.heads:   # [B, C, N] -> [B, N, C]: the channel dim moves
            st.space[node] = Channels(sid, d1 if cdim == d0 else d0 if cdim == d1 else cdim, 1)
            return True
        if x.dim() == 4 and cdim not in (d0, d1) and g.members and g.heads:
            st.space[node] = Channels(sid, cdim, factor)
            return True
        if cdim in (d0, d1) and x.dim() == 4 and cdim != x.dim() - 1 and x.dim() - 1 not in (d0, d1) and \
                (factor == 1 or g.heads):
            st.space[node] = Channels(sid, d1 if cdim == d0 else d0, factor)
            return True
        return False


@register_builtin
class HeadMatmul(ChannelRule):
    """Explicit attention: ``q @ k^T`` and ``softmax(scores) @ v`` share the heads."""

    ops = (aten.matmul.default,)

    def __call__(self, node, st):
        got = _head_input(node, st)
        if got is None:
            return False
        src, (sid, cdim, factor), x, g = got
        out, other = _val(node), node.args[1]
        if cdim == 1 and x.dim() == 4 and out.dim() == 4 and other in st.space and \
                st.space[other].dim == 1 and isinstance(_val(other), torch.Tensor) and _val(other).dim() == 4 and \
                size_expr(x.shape[1]) == size_expr(_val(other).shape[1]):
            joined, unit, why = st.join_units([(sid, factor), (st.space[other].sid, st.space[other].factor)])
            if joined is None:
                st.mark(src, why)
                st.mark(other, why)
                return True
            st.space[node] = Channels(joined, 1, unit)
            return True
        return False


@register_builtin
class HeadSoftmax(ChannelRule):
    ops = (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)

    def __call__(self, node, st):
        got = _head_input(node, st)
        if got is None:
            return False
        src, (sid, cdim, factor), x, g = got
        if node.args[1] % x.dim() != cdim and (factor == 1 or g.heads):
            st.space[node] = Channels(sid, cdim, factor)
            return True
        return False


@register_builtin
class ScaledDotProductAttention(ChannelRule):
    """``sdpa(q, k, v)`` with head spaces on dim 1 joins them head by head (a mask broadcast over heads).

    Grouped-query attention (key/value heads repeated by ``repeat_kv``, or ``enable_gqa=True``): a
    key/value head covers ``n_rep`` query heads, so the query heads are grouped ``n_rep`` to a channel
    first (:meth:`ChannelState.join_units`) and a pruned key/value head takes its query heads with it.
    """

    ops = (_SDPA,)

    def __call__(self, node, st):
        got = _head_input(node, st)
        if got is None:
            return False
        x = got[2]
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mv = _val(mask) if isinstance(mask, fx.Node) else None
        if not (all(a in st.space and st.space[a].dim == 1 for a in (q, k, v)) and x.dim() == 4 and
                (mv is None or (isinstance(mv, torch.Tensor) and mv.dim() == 4 and size_expr(mv.shape[1]) == 1))
                and mask not in st.space):
            return False
        heads = [size_expr(_val(a).shape[1]) for a in (q, k, v)]
        if not all(isinstance(h, int) for h in heads) or heads[0] % heads[1] or heads[1] != heads[2] or \
                (heads[0] != heads[1] and not node.kwargs.get("enable_gqa", False)):
            return False
        parts = [(st.space[a].sid, st.space[a].factor * (heads[0] // h)) for a, h in zip((q, k, v), heads)]
        sid, unit, why = st.join_units(parts)
        if sid is None:
            for a in (q, k, v):
                st.mark(a, why)
            return True
        st.space[node] = Channels(sid, 1, unit)
        return True


# ---------------------------------------------------------------------------------- repeated heads

@register_builtin
class Unsqueeze(ChannelRule):
    """A new dim before or after the channel dim (``repeat_kv``'s ``k[:, :, None]``) moves or keeps it."""

    ops = (aten.unsqueeze.default,)

    def __call__(self, node, st):
        src, out = node.args[0], _val(node)
        if src not in st.space or not isinstance(out, torch.Tensor):
            return False
        sid, cdim, factor = st.space[src]
        if factor != 1 and not st.group(sid).heads:
            return False
        d = node.args[1] % out.dim()
        st.space[node] = Channels(sid, cdim + 1 if d <= cdim else cdim, factor)
        return True


@register_builtin
class Expand(ChannelRule):
    """``expand`` broadcasting other dims keeps the channels (``repeat_kv``: ``[B, Hkv, 1, T, D] ->
    [B, Hkv, n_rep, T, D]``); a literal channel count in its sizes is rewritten."""

    ops = (aten.expand.default,)

    def __call__(self, node, st):
        src, out = node.args[0], _val(node)
        x = _val(src)
        if src not in st.space or not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
            return False
        sid, cdim, factor = st.space[src]
        g = st.group(sid)
        if factor != 1 and not g.heads:
            return False
        at = cdim + out.dim() - x.dim()
        if size_expr(out.shape[at]) != size_expr(x.shape[cdim]):
            return False
        lit = node.args[1][at]
        if isinstance(lit, int) and lit != -1:
            if lit != g.size * factor:
                return False
            g.members.append((HeadCount if g.heads else ViewSize)(node, at, lit, factor))
        st.space[node] = Channels(sid, at, factor)
        return True

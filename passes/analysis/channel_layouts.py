"""Channel *layouts*: tensors whose channels come from several spaces, in some order.

Rules of the ``channel-groups`` analysis (:mod:`fxopt.passes.analysis.dependency`) for the
``layout`` phase (:mod:`fxopt.passes.analysis.channel_rules`). A layout is a list of
:class:`~fxopt.passes.analysis.channel_members.Segment`: ``size`` channels
``start .. start + size - 1`` of a space (a space id while the analysis runs, the final
:class:`ChannelGroup` after it; ``None`` for channels no producer owns, like the model
input). Layouts come from:

* a concatenation along the channel dim (DenseNet, Inception, ShuffleNet): its inputs'
  layouts one after the other;
* a split/chunk along the channel dim: each part is a slice of its input's layout; the
  split's sizes are rewritten to the kept counts after pruning, and every space cut by a
  split keeps the same fraction of channels in each part (so no part becomes empty);
* a channel shuffle (``view [N, g, C/g, ...] -> transpose(1, 2) -> view [N, C, ...]``): a
  permutation of its input's layout; after pruning it becomes an ``index_select`` with the
  permutation of the kept channels, so the two halves need not keep the same indices.

Batch norms, activations, pooling and depthwise convs carry a layout; convs and linears
reading it are sliced at the kept channels of each segment (:class:`LayoutReads`), and so
are batch norms (:class:`LayoutNorm`), depthwise convs (:class:`LayoutDepthwise`) and
``[N, C]`` flatten sizes (:class:`LayoutFlatten`). After pruning, every tensor holds the
kept channels of its layout in layout order, which is what makes these rewrites consistent.

``slice`` and ``cat`` along a dim that is not the channel (head) dim keep a space whole
(Phi's partial rotary embedding); those two rules live here too, since they must be asked
before the concatenation rule.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, is_conv, is_linear
from fxopt.ir.meta import size_expr
from fxopt.ir.rewrite_utils import arg

from fxopt.passes.analysis.channel_members import (HeadCount, LayoutDepthwise, LayoutFlatten, LayoutNorm,
                                                   LayoutReads, Segment, Shuffle, SplitSizes, layout_mask)
from fxopt.passes.analysis.channel_rules import ChannelRule, Channels, ChannelState, register_builtin

__all__ = ["layout_mask", "elementwise_unary", "BN", "POOL", "VIEWS", "COPIES", "REDUCE",
           "UNARY"]

BN = aten._native_batch_norm_legit_no_training.default
POOL = {aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
        aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
        aten.max_pool3d.default, aten.avg_pool3d.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_SEG_THROUGH = {aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clone.default,
                aten.dropout.default, aten.contiguous.default, aten.alias.default} | POOL
UNARY = {aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.hardswish.default,
         aten.hardsigmoid.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
         aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.clamp.default,
         aten.clamp_min.default, aten.clamp_max.default, aten.neg.default, aten.abs.default, aten.exp.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}

_val = ChannelState.val


def elementwise_unary(t: Any) -> bool:
    """Activations and other ops whose output channel c depends only on input channel c."""
    return t in UNARY or isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _dim_of(node: fx.Node, index: int, default: int = 0) -> int:
    return node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)


def as_layout(node: Any, st: ChannelState) -> tuple[list[Segment], int] | None:
    """``node``'s channels as a layout, with its channel dim (None when it has no channels)."""
    if node in st.segs:
        return st.segs[node]
    if node in st.space and st.space[node].factor == 1:
        sid, cdim, _ = st.space[node]
        # not in st.layouts yet: the rule that keeps it registers it
        return [Segment(sid, int(size_expr(_val(node).shape[cdim])), 0)], cdim
    return None


def _skipped_by_cat(a: Any, out: Any) -> bool:
    """A legacy empty 1-D tensor, which ``cat`` skips (the empty key/value cache a decoder starts from)."""
    v = _val(a)
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == 0 and out.dim() > 1


def slice_layout(layout: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The segments covering channels ``lo .. hi - 1`` of ``layout``."""
    out, offset = [], 0
    for seg in layout:
        a, b = max(lo, offset), min(hi, offset + seg.size)
        if a < b:
            out.append(Segment(seg.group, b - a, seg.start + a - offset))
        offset += seg.size
    return out


def _spread(layout: list[Segment]) -> list[Segment]:
    """One segment per channel."""
    return [Segment(s.group, 1, s.start + i) for s in layout for i in range(s.size)]


def _is_heads(st: ChannelState, sid: int) -> bool:
    return any(isinstance(m, HeadCount) for m in st.group(sid).members)


@register_builtin
class SliceAlongOtherDim(ChannelRule):
    """``slice`` along a dim that is not the channel (head) dim keeps the space."""

    ops = (aten.slice.Tensor,)
    phase = "layout"

    def __call__(self, node, st):
        out = _val(node)
        if not isinstance(out, torch.Tensor) or node.args[0] not in st.space:
            return False
        sid, cdim, factor = st.space[node.args[0]]
        if _dim_of(node, 1) % out.dim() != cdim and (factor == 1 or _is_heads(st, sid)):
            st.space[node] = Channels(sid, cdim, factor)
            return True
        return False


@register_builtin
class CatAlongOtherDim(ChannelRule):
    """A ``cat`` along another dim joins attention-head spaces (of one projection, or Q/K pieces:
    Phi's partial rotary embedding, ``rotate_half``); other such concatenations are left to the
    rules after it."""

    ops = (aten.cat.default,)
    phase = "layout"

    def __call__(self, node, st):
        out = _val(node)
        tensors = [a for a in node.args[0] if isinstance(a, fx.Node)]
        if not isinstance(out, torch.Tensor) or len(tensors) != len(node.args[0]):
            return False
        tensors = [a for a in tensors if not _skipped_by_cat(a, out)]
        if not tensors or not all(a in st.space for a in tensors):
            return False
        sid, cdim, factor = st.space[tensors[0]]
        if factor != 1 or _dim_of(node, 1) % out.dim() == cdim or \
                any(st.space[a][1:] != (cdim, 1) for a in tensors) or \
                not all(_is_heads(st, st.space[a].sid) for a in tensors):
            return False
        for a in tensors[1:]:
            sid = st.union(sid, st.space[a].sid)
        st.space[node] = Channels(sid, cdim, 1)
        return True


@register_builtin
class SplitAlongOtherDim(ChannelRule):
    """A ``split`` of attention heads along another dim (LeViT's per-head ``q, k, v`` of one
    projection: ``view(B, N, H, -1).split([kd, kd, d], dim=3)``): every part keeps the heads."""

    ops = tuple(_SPLITS)
    phase = "layout"

    def __call__(self, node, st):
        x = node.args[0] if node.args else None
        xv = _val(x)
        if x not in st.space or not isinstance(xv, torch.Tensor) or not _is_heads(st, st.space[x].sid):
            return False
        if _dim_of(node, 2) % xv.dim() == st.space[x].dim:
            return False
        st.space[node] = st.space[x]
        return True


@register_builtin
class SplitPart(ChannelRule):
    """``getitem`` of a split: one part's layout."""

    ops = (operator.getitem,)
    phase = "layout"

    def __call__(self, node, st):
        src = node.args[0]
        if src in st.space and src.target in _SPLITS:   # a part of heads split along another dim
            st.space[node] = st.space[src]
            return True
        if src not in st.splits:
            return False
        parts, cdim = st.splits[src]
        st.segs[node] = (parts[node.args[1]], cdim)
        return True


@register_builtin
class Split(ChannelRule):
    """A split/chunk along the channel dim: each part a slice of the input's layout."""

    ops = tuple(_SPLITS)
    phase = "layout"

    def __call__(self, node, st):
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or not (x in st.segs or x in st.space):
            return False
        xv = _val(x)
        got = as_layout(x, st)
        dim = _dim_of(node, 2) % xv.dim()
        sizes = node.args[1]
        total = int(size_expr(xv.shape[dim]))
        if got is None or got[1] != dim or not isinstance(sizes, (int, list, tuple)):
            return False
        layout = got[0]
        if isinstance(sizes, int):
            sizes = [min(sizes, total - lo) for lo in range(0, total, sizes)]
        parts, lo = [], 0
        for s in sizes:
            parts.append(slice_layout(layout, lo, lo + s))
            lo += s
        st.layouts.extend([layout] + parts)
        st.splits[node] = (parts, dim)
        st.add_layout(SplitSizes(node, layout, tuple(parts)))
        return True


@register_builtin
class ChannelShuffle(ChannelRule):
    """``view [N, C, *r] -> [N, g, C/g, *r] -> transpose(1, 2) -> (copy) -> view [N, C, *r]``."""

    ops = tuple(VIEWS)
    phase = "layout"

    def __call__(self, node, st):
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or not (x in st.segs or x in st.space):
            return False
        xv, ov = _val(x), _val(node)
        got = as_layout(x, st)
        if got is None or got[1] != 1 or not isinstance(ov, torch.Tensor) or ov.dim() != xv.dim() + 1:
            return False
        xs, os_ = [size_expr(d) for d in xv.shape], [size_expr(d) for d in ov.shape]
        if xs[2:] != os_[3:] or not all(isinstance(s, int) for s in os_[1:3]) or os_[1] * os_[2] != xs[1]:
            return False
        chain, n = [], node
        while len(n.users) == 1:
            n = next(iter(n.users))
            chain.append(n)
            if len(chain) > 1 and n.target not in COPIES:
                break
        if len(chain) < 2 or chain[0].target is not aten.transpose.int or \
                sorted(d % ov.dim() for d in chain[0].args[1:3]) != [1, 2] or chain[-1].target not in VIEWS:
            return False
        if any(c.target not in COPIES for c in chain[1:-1]) or [size_expr(d) for d in _val(chain[-1]).shape] != xs:
            return False
        g, per = os_[1], os_[2]
        flat = _spread(got[0])
        perm = [(j % g) * per + j // g for j in range(xs[1])]
        out = [flat[i].copy() for i in perm]
        st.layouts.extend([flat, out])
        end = chain[-1]
        st.segs[end] = (out, 1)
        st.add_layout(Shuffle(end, flat, tuple(perm), x))
        return True


@register_builtin
class Concat(ChannelRule):
    """``cat`` along the channel dim: the output is a layout of its inputs' spaces."""

    ops = (aten.cat.default,)
    phase = "layout"

    def __call__(self, node, st):
        tensors = list(node.args[0])
        out = _val(node)
        if not isinstance(out, torch.Tensor):
            return False
        dim = _dim_of(node, 1) % out.dim()
        layout: list[Segment] = []
        for a in tensors:
            v = _val(a)
            if _skipped_by_cat(a, out):
                continue  # a legacy empty tensor (an empty key/value cache): cat skips it
            if a in st.space and st.space[a].dim == dim and st.space[a].factor == 1:
                layout.append(Segment(st.space[a].sid, int(size_expr(v.shape[dim])), 0))
            elif a in st.segs and st.segs[a][1] == dim:
                layout.extend(s.copy() for s in st.segs[a][0])
            elif isinstance(v, torch.Tensor) and isinstance(size_expr(v.shape[dim]), int) and a not in st.space:
                layout.append(Segment(None, int(size_expr(v.shape[dim])), 0))
            else:
                for b in tensors:
                    st.mark(b, f"concatenation {node.name} along another dim")
                return True
        st.layouts.append(layout)
        st.segs[node] = (layout, dim)
        return True


@register_builtin
class ThroughLayout(ChannelRule):
    """Ops reading a layout: batch norm, activations, pooling, depthwise convs carry it; convs and
    linears consume it (and are then handled as producers); anything else keeps it whole."""

    phase = "layout"

    def __call__(self, node, st):
        seg_ins = [a for a in node.all_input_nodes if a in st.segs]
        if not seg_ins:
            return False
        t = node.target
        x = node.args[0] if node.args else None
        if x in st.segs and len(seg_ins) == 1:
            layout, cdim = st.segs[x]
            xv, ov = _val(x), _val(node)
            if is_conv(node) and t in (aten.conv2d.default, aten.conv1d.default) and cdim == 1:
                groups = arg(node, 6, "groups", 1)
                w = _val(node.args[1])
                if groups == 1:
                    st.add_layout(LayoutReads(node, layout))
                    return False  # the conv's own output is handled as usual
                if isinstance(w, torch.Tensor) and groups == w.shape[0] == xv.shape[1] and w.shape[1] == 1:
                    st.add_layout(LayoutDepthwise(node, layout))   # depthwise: the output keeps the layout
                    st.segs[node] = (layout, cdim)
                    return True
            if is_linear(node) and cdim == xv.dim() - 1:
                st.add_layout(LayoutReads(node, layout))
                return False
            if t is BN and cdim == 1:
                st.add_layout(LayoutNorm(node, layout))
                st.segs[node] = (layout, cdim)
                return True
            if t is operator.getitem and x.target is BN and node.args[1] == 0:
                st.segs[node] = st.segs[x]
                return True
            pointwise = elementwise_unary(t) and len(node.all_input_nodes) == 1 and isinstance(ov, torch.Tensor) \
                and tuple(ov.shape) == tuple(xv.shape)
            if (t in _SEG_THROUGH and (t not in POOL or cdim == 1)) or pointwise:
                st.segs[node] = st.segs[x]
                return True
            if t in REDUCE and cdim == 1 and isinstance(ov, torch.Tensor) and \
                    all(d % xv.dim() > cdim for d in node.args[1]):
                st.segs[node] = st.segs[x]     # a mean over the spatial dims (global pooling)
                return True
            if t in VIEWS | {aten.flatten.using_ints} and cdim == 1 and isinstance(ov, torch.Tensor) and \
                    ov.dim() == 2 and all(size_expr(d) == 1 for d in xv.shape[2:]) and \
                    size_expr(ov.shape[1]) == size_expr(xv.shape[1]):
                # [N, C, 1, 1] -> [N, C] after global pooling: the layout carries to the classifier
                st.add_layout(LayoutFlatten(node, layout))
                st.segs[node] = (layout, 1)
                return True
        # an op no layout rule knows: every channel reaching it is kept, those of its inputs that are
        # plain spaces too (sdpa reading a concatenated Q and K must keep V's heads whole as well)
        producer = is_conv(node) or is_linear(node)
        st.mark_all(node, seg_ins if producer else node.all_input_nodes)
        return not producer

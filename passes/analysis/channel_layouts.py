"""Channel *layouts*: tensors whose channels come from several spaces, in some order.

Used by the ``channel-groups`` analysis (:mod:`fxopt.passes.analysis.dependency`). A layout is a
list of entries ``[space, size, start]``: ``size`` channels ``start .. start + size - 1`` of
``space`` (a space id while the analysis runs, the final :class:`ChannelGroup` after it;
``None`` for channels no producer owns, like the model input). Layouts come from:

* a concatenation along the channel dim (DenseNet, Inception, ShuffleNet): its inputs'
  layouts one after the other;
* a split/chunk along the channel dim: each part is a slice of its input's layout; the
  split's sizes are rewritten to the kept counts after pruning, and every space cut by a
  split keeps the same fraction of channels in each part (so no part becomes empty);
* a channel shuffle (``view [N, g, C/g, ...] -> transpose(1, 2) -> view [N, C, ...]``): a
  permutation of its input's layout; after pruning it becomes an ``index_select`` with the
  permutation of the kept channels, so the two halves need not keep the same indices.

Batch norms, activations, pooling and depthwise convs carry a layout; convs and linears
reading it are sliced at the kept channels of each entry (``seg_in``), and so are batch
norms (``seg_bn``), depthwise convs (``seg_dw``) and ``[N, C]`` flatten sizes
(``seg_flatten``). After pruning, every tensor holds the kept channels of its layout in
layout order, which is what makes these rewrites consistent.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import aten, is_conv, is_linear
from fxopt.ir.meta import size_expr
from fxopt.ir.rewrite_utils import arg

__all__ = ["layout_mask", "elementwise_unary", "along_other_dim", "BN", "POOL", "VIEWS", "COPIES", "REDUCE", "UNARY"]

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


def elementwise_unary(t: Any) -> bool:
    """Activations and other ops whose output channel c depends only on input channel c."""
    return t in UNARY or isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _dim_of(node: fx.Node, index: int, default: int = 0) -> int:
    return node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)


def as_layout(node: Any, space: dict, segs: dict, layouts: list) -> tuple[list, int] | None:
    """``node``'s channels as a layout, with its channel dim (None when it has no channels)."""
    if node in segs:
        return segs[node]
    if node in space and space[node][2] == 1:
        sid, cdim, _ = space[node]
        v = _val(node)
        layout = [[sid, int(size_expr(v.shape[cdim])), 0]]
        layouts.append(layout)
        return layout, cdim
    return None


def slice_layout(layout: list, lo: int, hi: int) -> list:
    """The entries covering channels ``lo .. hi - 1`` of ``layout``."""
    out, offset = [], 0
    for sid, size, start in layout:
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            out.append([sid, b - a, start + a - offset])
        offset += size
    return out


def _spread(layout: list) -> list:
    """One entry per channel."""
    return [[sid, 1, start + i] for sid, size, start in layout for i in range(size)]


def concat(node: fx.Node, space: dict, segs: dict, layouts: list, mark: Any) -> bool:
    """``cat`` along the channel dim: the output is a layout of its inputs' spaces."""
    if node.target is not aten.cat.default:
        return False
    tensors = list(node.args[0])
    out = _val(node)
    if not isinstance(out, torch.Tensor):
        return False
    dim = _dim_of(node, 1) % out.dim()
    layout: list = []
    for a in tensors:
        v = _val(a)
        if a in space and space[a][1] == dim and space[a][2] == 1:
            layout.append([space[a][0], int(size_expr(v.shape[dim])), 0])
        elif a in segs and segs[a][1] == dim:
            layout.extend(list(e) for e in segs[a][0])
        elif isinstance(v, torch.Tensor) and isinstance(size_expr(v.shape[dim]), int) and a not in space:
            layout.append([None, int(size_expr(v.shape[dim])), 0])
        else:
            for b in tensors:
                mark(b, f"concatenation {node.name} along another dim")
            return True
    layouts.append(layout)
    segs[node] = (layout, dim)
    return True


def split_or_shuffle(node: fx.Node, space: dict, segs: dict, splits: dict, layouts: list,
                     seg_member: Any, mark: Any) -> bool:
    """Splits/chunks along the channel dim, their parts, and channel shuffles (see module docs)."""
    t = node.target
    if t is operator.getitem and node.args[0] in splits:
        parts, cdim = splits[node.args[0]]
        segs[node] = (parts[node.args[1]], cdim)
        return True
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    x = node.args[0]
    xv = _val(x)
    if t in _SPLITS and (x in segs or x in space):
        got = as_layout(x, space, segs, layouts)
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
        layouts.extend(parts)
        splits[node] = (parts, dim)
        seg_member("split", node, (layout, parts))
        return True
    if t in VIEWS and (x in segs or x in space):
        return _shuffle(node, space, segs, layouts, seg_member)
    return False


def _shuffle(node: fx.Node, space: dict, segs: dict, layouts: list, seg_member: Any) -> bool:
    """``view [N, C, *r] -> [N, g, C/g, *r] -> transpose(1, 2) -> (copy) -> view [N, C, *r]``."""
    x, xv, ov = node.args[0], _val(node.args[0]), _val(node)
    got = as_layout(x, space, segs, layouts)
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
    out = [list(flat[i]) for i in perm]
    layouts.extend([flat, out])
    end = chain[-1]
    segs[end] = (out, 1)
    seg_member("shuffle", end, (flat, perm, x))
    return True


def along_other_dim(node: fx.Node, space: dict, uf: Any) -> bool:
    """``slice`` and ``cat`` along a dimension that is not the channel (or head) dim keep the space:
    Phi's partial rotary embedding splits every head's features into a rotated part and a
    pass-through part and concatenates them back, ``rotate_half`` does the same; the heads
    (or channels) are untouched, so Q and K keep their head space to the attention.
    A ``cat`` joins only attention-head spaces (of one projection, or Q/K pieces); other
    concatenations along a non-channel dim keep their spaces whole, as before."""
    out = _val(node)
    if not isinstance(out, torch.Tensor) or not node.args:
        return False
    if node.target is aten.slice.Tensor and node.args[0] in space:
        sid, cdim, factor = space[node.args[0]]
        if factor == 1 and _dim_of(node, 1) % out.dim() != cdim:
            space[node] = (sid, cdim, 1)
            return True
        return False
    if node.target is aten.cat.default:
        tensors = [a for a in node.args[0] if isinstance(a, fx.Node)]
        if len(tensors) != len(node.args[0]) or not tensors or not all(a in space for a in tensors):
            return False
        sid, cdim, factor = space[tensors[0]]
        if factor != 1 or _dim_of(node, 1) % out.dim() == cdim or \
                any(space[a][1:] != (cdim, 1) for a in tensors) or \
                not all(any(m[0] == "heads" for m in uf.group(space[a][0]).members) for a in tensors):
            return False
        for a in tensors[1:]:
            sid = uf.union(sid, space[a][0])
        space[node] = (sid, cdim, 1)
        return True
    return False


def through_concat(node: fx.Node, segs: dict, seg_member: Any, mark: Any) -> bool:
    """Ops reading a layout: batch norm, activations, pooling, depthwise convs carry it; convs consume it."""
    seg_ins = [a for a in node.all_input_nodes if a in segs]
    if not seg_ins:
        return False
    t = node.target
    x = node.args[0] if node.args else None
    if x in segs and len(seg_ins) == 1:
        layout, cdim = segs[x]
        xv, ov = _val(x), _val(node)
        if is_conv(node) and t in (aten.conv2d.default, aten.conv1d.default) and cdim == 1:
            groups = arg(node, 6, "groups", 1)
            w = _val(node.args[1])
            if groups == 1:
                seg_member("seg_in", node, layout)
                return False  # the conv's own output is handled as usual
            if isinstance(w, torch.Tensor) and groups == w.shape[0] == xv.shape[1] and w.shape[1] == 1:
                seg_member("seg_dw", node, layout)   # depthwise: the output keeps the layout
                segs[node] = (layout, cdim)
                return True
        if is_linear(node) and cdim == xv.dim() - 1:
            seg_member("seg_in", node, layout)
            return False
        if t is BN and cdim == 1:
            seg_member("seg_bn", node, layout)
            segs[node] = (layout, cdim)
            return True
        if t is operator.getitem and x.target is BN and node.args[1] == 0:
            segs[node] = segs[x]
            return True
        pointwise = elementwise_unary(t) and len(node.all_input_nodes) == 1 and isinstance(ov, torch.Tensor) and \
            tuple(ov.shape) == tuple(xv.shape)
        if (t in _SEG_THROUGH and (t not in POOL or cdim == 1)) or pointwise:
            segs[node] = segs[x]
            return True
        if t in REDUCE and cdim == 1 and isinstance(ov, torch.Tensor) and \
                all(d % xv.dim() > cdim for d in node.args[1]):
            segs[node] = segs[x]     # a mean over the spatial dims (global pooling)
            return True
        if t in VIEWS | {aten.flatten.using_ints} and cdim == 1 and isinstance(ov, torch.Tensor) and \
                ov.dim() == 2 and all(size_expr(d) == 1 for d in xv.shape[2:]) and \
                size_expr(ov.shape[1]) == size_expr(xv.shape[1]):
            # [N, C, 1, 1] -> [N, C] after global pooling: the layout carries to the classifier
            seg_member("seg_flatten", node, layout)
            segs[node] = (layout, 1)
            return True
    # an op no layout rule knows: every channel reaching it is kept, those of its inputs that are
    # plain spaces too (sdpa reading a concatenated Q and K must keep V's heads whole as well)
    for a in (node.all_input_nodes if not (is_conv(node) or is_linear(node)) else seg_ins):
        mark(a, f"used by {getattr(t, '__name__', str(t))}")
    return not (is_conv(node) or is_linear(node))


def layout_mask(layout: list, decided: dict) -> torch.Tensor:
    """Which channels of ``layout`` survive, given ``decided`` (id(group) -> sorted kept indices)."""
    full: dict[int, torch.Tensor] = {}
    parts = []
    for group, size, start in layout:
        keep = decided.get(id(group)) if group is not None else None
        if keep is None:
            parts.append(torch.ones(size, dtype=torch.bool))
            continue
        if id(group) not in full:
            m = torch.zeros(group.size, dtype=torch.bool)
            m[keep] = True
            full[id(group)] = m
        parts.append(full[id(group)][start:start + size])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

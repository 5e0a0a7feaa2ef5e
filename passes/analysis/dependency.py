"""``channel-groups``: which tensors must lose the same channels together.

Structured pruning removes whole output channels of a convolution or linear. Every
tensor coupled to those channels must lose the same indices: the batch norm after it,
the layers that read it, and through residual adds and gating multiplies, the other
producers added to it. This analysis finds those groups with a union-find over
*channel spaces*:

* a conv/linear output opens a space (its weight's dim 0);
* batch/layer norm, activations, unary elementwise ops, pooling, reductions over other
  dims, permutes (the channel dim moves) and flattening ``[N, C, H, W] -> [N, C*H*W]``
  carry the space through;
* ``slice`` along another dim than the channel (head) dim carries the space, and so does a
  ``cat`` of head spaces along another dim, joining them (Phi's partial rotary embedding);
* a binary elementwise op joins the spaces of its two inputs (residual adds, SE gates); a
  per-channel operand computed from one parameter (a layer scale, Swin's relative position
  bias table) is recorded so pruning slices that parameter;
* attention: a projection's output viewed as ``[..., H, D]`` becomes a space of H heads,
  carried through transposes, head-moving views, softmax and ``matmul``/``sdpa`` (which
  join Q, K and V head by head) to the merge back to ``H*D`` features;
* grouped-query attention: ``repeat_kv`` (``unsqueeze -> expand -> view``) or ``sdpa(enable_gqa=True)``
  maps ``n_rep`` query heads to one key/value head; the query-head space is *coarsened* (``n_rep``
  heads per channel, :meth:`ChannelState.coarsen`) and joined with the key/value space;
* views that keep the channel dim whole (``[B, N, C] <-> [B*N, C]``, ``[N, C, H, W] -> [N, C, H*W]``)
  carry the space, and so do ``split``s of heads along the head dim (LeViT's per-head q/k/v);
* spaces whose members slice one shared parameter (a layer applied at every depth) are joined
  at the end, so every use keeps the same channels;
* a depthwise convolution carries its input space to its output (and must shrink with it);
  so does a grouped ``C -> C`` convolution (ResNeXt), whose groups then lose channels equally;
  a grouped conv that changes the channel count opens its own space, and both its input and
  output spaces keep the same number of channels in every group;
* conv/linear inputs, norm parameters and flatten sizes are recorded as consumers.

Concatenations, splits/chunks and channel shuffles do not join spaces: their outputs are
*layouts* of segments of several spaces (:mod:`fxopt.passes.analysis.channel_layouts`), carried
through batch norms, activations, pooling and depthwise convs to the convs/linears that
read them (``LayoutReads``/``LayoutNorm``/``LayoutDepthwise`` members). Pruning slices each reader at the
kept channels, rewrites split sizes, and turns a shuffle into an ``index_select`` of the
kept channels, so DenseNet/Inception/ShuffleNet-style models prune per producer.

Each op kind is one rule object in a registry (:mod:`fxopt.passes.analysis.channel_rules`; the
attention-head rules live in :mod:`fxopt.passes.analysis.channel_attention`);
what a group holds are typed members (:mod:`fxopt.passes.analysis.channel_members`), each
knowing how ``prune`` rewrites it. Custom ops declare how they propagate channels with
:func:`register_channel_rule`.
Anything else that touches a space (other reshapes, binary ops on split parts, the graph
outputs other than a key/value cache's head dim, ops this analysis does not know) marks it *unprunable*, so pruning never breaks
a model it does not understand; the result records why. Groups are the roots of the
union-find.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis
from fxopt.ir.dialect import aten, is_conv, is_linear
from fxopt.ir.graph_utils import graph_cache_outputs
from fxopt.ir.meta import size_expr
from fxopt.ir.rewrite_utils import arg, attr_tensor

from fxopt.passes.analysis.channel_members import (BatchNorm, ChannelGroup, Depthwise, FlattenSize, GroupedConv,
                                                   GroupedInput, GroupedOutput, LayerNorm, ParamOperand, Produces,
                                                   Reads, ViewSize)
from fxopt.passes.analysis.channel_rules import (CHANNEL_RULES, ChannelRule, Channels, ChannelState, apply_rules,
                                                 register_builtin, register_channel_rule)
from fxopt.passes.analysis.channel_layouts import BN, COPIES, POOL, REDUCE, VIEWS, elementwise_unary
from fxopt.passes.analysis import channel_attention  # noqa: F401  (head rules, asked before Flatten)

__all__ = ["ChannelGroup", "ChannelGroupsAnalysis", "channel_groups", "register_channel_rule", "CHANNEL_RULES",
           "ChannelRule"]

_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
_val = ChannelState.val


def channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of ``gm`` (see the module docstring)."""
    st = ChannelState(gm)
    cache = graph_cache_outputs(gm)
    for node in gm.graph.nodes:
        if node.op == "output":
            leaves = torch.utils._pytree.tree_leaves(node.args[0])
            for i, a in enumerate(leaves):
                if isinstance(a, fx.Node) and not (i in cache and _cache_heads(a, st)):
                    st.mark(a, "reaches the model output")
            continue
        if node.op != "call_function":
            continue
        if apply_rules(node, st, "layout") or apply_rules(node, st, "producer"):
            continue
        if not st.ins(node) or apply_rules(node, st, "space"):
            continue
        st.mark_all(node)
    return st.result()


def _cache_heads(node: fx.Node, st: ChannelState) -> bool:
    """A key/value cache tensor ``[B, heads, T, D]`` returned by the model may lose heads (the pruned
    model's own cache; see :func:`fxopt.ir.graph_utils.output_structure`)."""
    v, ch = _val(node), st.space.get(node)
    return ch is not None and isinstance(v, torch.Tensor) and v.dim() == 4 and ch.dim == 1 and st.group(ch.sid).heads


# ---------------------------------------------------------------------------------- producers

@register_builtin
class ConvLinear(ChannelRule):
    """A conv/linear output opens a space (its weight's dim 0); its input space gains a reader,
    or for depthwise and grouped ``C -> C`` convs, carries on to the output."""

    phase = "producer"

    def matches(self, node):
        return is_conv(node) or is_linear(node)

    def __call__(self, node, st):
        t, out, ins = node.target, _val(node), st.ins(node)
        x = node.args[0]
        w = attr_tensor(st.gm, node.args[1])
        if w is None or (is_conv(node) and t is not aten.conv2d.default and t is not aten.conv1d.default):
            for a in ins:
                st.mark(a, f"read by {t}")
            return True
        groups = arg(node, 6, "groups", 1) if is_conv(node) else 1
        if x in st.space:
            sid, cdim, factor = st.space[x]
            size = st.group(sid).size
            want = 1 if is_conv(node) else (_val(x).dim() - 1 if isinstance(_val(x), torch.Tensor) else -1)
            if cdim != want:
                st.mark(x, f"channel dim {cdim} read as features by {node.name}")
            elif groups == 1:
                st.add(sid, Reads(node, factor))
            elif groups == int(w.shape[0]) and int(w.shape[1]) == 1 and factor == 1:
                st.add(sid, Depthwise(node))   # depthwise: output space = input space
                st.space[node] = Channels(sid, 1, 1)
                return True
            elif factor == 1 and int(w.shape[0]) == int(w.shape[1]) * groups == size:
                # grouped C -> C conv: input and output share one space, pruned equally per group
                st.add(sid, GroupedConv(node, groups))
                st.space[node] = Channels(sid, 1, 1)
                return True
            elif factor == 1 and int(w.shape[1]) * groups == size:
                # grouped C_in -> C_out conv: inputs kept equally per group, columns gathered per group
                st.add(sid, GroupedInput(node, groups))
            else:
                st.mark(x, f"grouped conv {node.name}")
        if isinstance(out, torch.Tensor):
            sid = st.new(int(w.shape[0]))
            st.group(sid).producers.append(node)
            st.add(sid, Produces(node))
            if groups > 1:   # its output rows come in groups too: keep the same number in each
                st.add(sid, GroupedOutput(node, groups))
            st.space[node] = Channels(sid, 1 if is_conv(node) else out.dim() - 1, 1)
        return True


# ---------------------------------------------------------------------------------- norms, pooling, reductions

@register_builtin
class BatchNormRule(ChannelRule):
    ops = (BN,)

    def __call__(self, node, st):
        src = node.args[0]
        if src not in st.space or st.space[src].dim != 1:
            return False
        sid, _, factor = st.space[src]
        x = _val(src)
        # a channel of ``factor`` features (after a flatten or a head split) owns that many norm entries
        if not isinstance(x, torch.Tensor) or size_expr(x.shape[1]) != st.group(sid).size * factor:
            st.mark(src, f"batch norm {node.name} over a dim the channels do not fill")
            return True
        st.add(sid, BatchNorm(node, factor))
        return st.carry(node, src)


@register_builtin
class BatchNormOutput(ChannelRule):
    """``getitem(batch_norm, 0)``: the normalized tensor."""

    ops = (operator.getitem,)

    def __call__(self, node, st):
        src = node.args[0]
        if src in st.space and src.target is BN and node.args[1] == 0:
            return st.carry(node, src)
        return False


@register_builtin
class LayerNormRule(ChannelRule):
    """A layer norm over the channel dim alone carries the space (its parameters are members)."""

    ops = (aten.layer_norm.default,)

    def __call__(self, node, st):
        src, out = node.args[0], _val(node)
        if src not in st.space:
            return False
        sid, cdim, f = st.space[src]
        if isinstance(out, torch.Tensor) and cdim == out.dim() - 1 and len(node.args[1]) == 1 and f == 1:
            st.add(sid, LayerNorm(node))
            return st.carry(node, src)
        st.mark(src, "layer norm over other dims")
        return True


@register_builtin
class Pool(ChannelRule):
    ops = tuple(POOL)

    def __call__(self, node, st):
        src = node.args[0]
        return src in st.space and st.space[src].dim == 1 and st.carry(node, src)


@register_builtin
class Reduce(ChannelRule):
    """A reduction over other dims than the channel dim carries it (moved if dims drop)."""

    ops = tuple(REDUCE)

    def __call__(self, node, st):
        src = node.args[0]
        if src not in st.space:
            return False
        sid, cdim, f = st.space[src]
        x = _val(src)
        dims = [d % x.dim() for d in node.args[1]] if isinstance(x, torch.Tensor) else []
        keep = bool(arg(node, 2, "keepdim", False))
        if f == 1 and dims and cdim not in dims:
            st.space[node] = Channels(sid, cdim if keep else cdim - sum(d < cdim for d in dims), 1)
        else:
            st.mark(src, f"reduction {node.name}")
        return True


# ---------------------------------------------------------------------------------- views, elementwise

@register_builtin
class Flatten(ChannelRule):
    """``[N, C, H, W] -> [N, C*H*W]`` carries the space with flatten factor H*W; other reshapes
    keep it whole."""

    ops = tuple(VIEWS) + (aten.flatten.using_ints,)

    def __call__(self, node, st):
        src, out = node.args[0], _val(node)
        x, ch = _val(src), st.space.get(src)
        if ch is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and \
                ch.dim == 1 and out.dim() == 2 and x.dim() >= 2 and ch.factor == 1:
            spatial = [size_expr(s) for s in x.shape[2:]]
            if all(isinstance(s, int) for s in spatial):
                hw = 1
                for s in spatial:
                    hw *= int(s)
                if size_expr(out.shape[1]) == int(size_expr(x.shape[1])) * hw:
                    st.add(ch.sid, FlattenSize(node, hw))
                    st.space[node] = Channels(ch.sid, 1, hw)
                    return True
        # [N, C, H, W] -> [N, C, H*W]: the dims after the channel dim change (a stem's tokens)
        if ch is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and ch.factor == 1 and \
                0 < ch.dim < min(x.dim(), out.dim()) and \
                [size_expr(d) for d in x.shape[:ch.dim + 1]] == [size_expr(d) for d in out.shape[:ch.dim + 1]] and \
                (len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)) or
                 node.args[1][ch.dim] == size_expr(x.shape[ch.dim]) or node.args[1][ch.dim] == -1 or
                 not isinstance(node.args[1][ch.dim], int)):
            if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) and \
                    isinstance(node.args[1][ch.dim], int) and node.args[1][ch.dim] != -1:
                st.add(ch.sid, ViewSize(node, ch.dim, node.args[1][ch.dim]))
            st.space[node] = Channels(ch.sid, ch.dim, 1)
            return True
        # [B, N, C] <-> [B*N, C]: the leading dims change, the channel dim stays last and whole
        # (LeViT's linear + BatchNorm1d over the flattened tokens)
        if ch is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and \
                x.dim() >= 2 and out.dim() >= 2 and ch.dim == x.dim() - 1 and \
                size_expr(out.shape[-1]) == size_expr(x.shape[-1]) and \
                (len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)) or
                 not isinstance(node.args[1][-1], int) or node.args[1][-1] in (-1, size_expr(x.shape[-1]))):
            if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) and \
                    isinstance(node.args[1][-1], int) and node.args[1][-1] != -1:
                st.add(ch.sid, ViewSize(node, out.dim() - 1, node.args[1][-1], ch.factor))
            st.space[node] = Channels(ch.sid, out.dim() - 1, ch.factor)
            return True
        for a in st.ins(node):
            st.mark(a, f"reshape {node.name}")
        return True


@register_builtin
class Binary(ChannelRule):
    """A binary elementwise op joins the spaces of its two inputs (residual adds, SE gates); a
    per-channel operand computed from one parameter is recorded so pruning slices it."""

    ops = tuple(_BINARY)

    def __call__(self, node, st):
        ins = st.ins(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(tensors) == 2 and all(a in st.space for a in tensors):
            (s1, c1, f1), (s2, c2, f2) = st.space[tensors[0]], st.space[tensors[1]]
            v1, v2 = _val(tensors[0]), _val(tensors[1])
            if f1 == f2 == 1 and v1.dim() - c1 == v2.dim() - c2:
                sid = st.union(s1, s2)
                st.space[node] = Channels(sid, c1 if v1.dim() >= v2.dim() else c2, 1)
            else:
                st.mark(tensors[0], f"mismatched channel dims at {node.name}")
                st.mark(tensors[1], f"mismatched channel dims at {node.name}")
            return True
        other = next((a for a in tensors if a not in st.space), None)
        src = ins[0]
        if other is not None:
            ov = _val(other)
            sid, cdim, f = st.space[src]
            sv = _val(src)
            # a tensor that broadcasts over the channel dim is fine (scalars, [N,1,H,W])
            lead = sv.dim() - ov.dim() if isinstance(ov, torch.Tensor) else 0
            k = cdim - lead
            if isinstance(ov, torch.Tensor) and 0 <= k < ov.dim() and size_expr(ov.shape[k]) != 1:
                found = _per_channel_param(st.gm, node, other, k)
                if found is None or f != 1:
                    st.mark(src, f"{node.name} mixes in a per-channel tensor")
                    return True
                st.add(sid, found)
        return st.carry(node, src)


def _per_channel_param(gm: fx.GraphModule, user: fx.Node, node: fx.Node, k: int) -> ParamOperand | None:
    """A per-channel operand (channel dim ``k``) computed from one parameter: a layer scale
    ``gamma[C, 1, 1]``, or Swin's relative position bias ``table[index].view(N, N, -1).permute(2, 0, 1)
    .unsqueeze(0)``. Returns the member slicing the parameter by the kept channels, or None when
    the operand is anything else."""
    views, reader, at = [], user, list(user.args).index(node) if node in user.args else -1
    while node.op == "call_function":
        t, v = node.target, _val(node)
        if not node.args or not isinstance(node.args[0], fx.Node) or not isinstance(v, torch.Tensor):
            return None
        src = node.args[0]
        sv = _val(src)
        if t is aten.unsqueeze.default:
            d = node.args[1] % v.dim()
            if d == k:
                return None
            k = k if k < d else k - 1
        elif t is aten.permute.default:
            k = [d % v.dim() for d in node.args[1]][k]
        elif t in VIEWS:   # only views that keep the channel dim last
            if k != v.dim() - 1 or size_expr(sv.shape[-1]) != size_expr(v.shape[-1]):
                return None
            if node.args[1][k] != -1:
                views.append((node, k))
            k = sv.dim() - 1
        elif t is aten.index.Tensor:
            idx = node.args[1]
            if len(idx) != 1 or k < 1 or not isinstance(_val(idx[0]), torch.Tensor) or _val(idx[0]).dim() != 1:
                return None
        elif t not in COPIES:
            return None
        reader, at, node = node, 0, src
    if node.op != "get_attr" or attr_tensor(gm, node) is None or at < 0:
        return None
    return ParamOperand(user, reader, at, k, tuple(views))


@register_builtin
class Permute(ChannelRule):
    """Channels-last blocks (ConvNeXt): the channel dim moves."""

    ops = (aten.permute.default,)

    def __call__(self, node, st):
        src, out = node.args[0], _val(node)
        if src in st.space and st.space[src].factor == 1 and isinstance(out, torch.Tensor):
            sid, cdim, _ = st.space[src]
            st.space[node] = Channels(sid, [d % out.dim() for d in node.args[1]].index(cdim), 1)
            return True
        return False


@register_builtin
class Copy(ChannelRule):
    ops = (aten.clone.default, aten.dropout.default, aten.contiguous.default, aten.alias.default)

    def __call__(self, node, st):
        return st.carry(node, st.ins(node)[0])


@register_builtin
class Pointwise(ChannelRule):
    """Activations and unary elementwise ops (``torch.Tag.pointwise``) carry the space."""

    def matches(self, node):
        return elementwise_unary(node.target)

    def __call__(self, node, st):
        ins, out = st.ins(node), _val(node)
        if len(ins) == 1 and isinstance(out, torch.Tensor) and isinstance(_val(ins[0]), torch.Tensor) and \
                tuple(out.shape) == tuple(_val(ins[0]).shape) and len(node.all_input_nodes) == 1:
            return st.carry(node, ins[0])
        return False


@register_analysis
class ChannelGroupsAnalysis(Analysis):
    """The list of :class:`ChannelGroup` of the graph (see module docs)."""

    name = "channel-groups"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> list[ChannelGroup]:
        return channel_groups(gm)

    def same(self, cached: Any, fresh: Any, gm: fx.GraphModule) -> bool:
        return [g.describe() for g in cached] == [g.describe() for g in fresh]

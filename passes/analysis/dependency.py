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
* a depthwise convolution carries its input space to its output (and must shrink with it);
  so does a grouped ``C -> C`` convolution (ResNeXt), whose groups then lose channels equally;
  a grouped conv that changes the channel count opens its own space, and both its input and
  output spaces keep the same number of channels in every group;
* conv/linear inputs, norm parameters and flatten sizes are recorded as consumers.

Concatenations, splits/chunks and channel shuffles do not join spaces: their outputs are
*layouts* of entries of several spaces (:mod:`fxopt.passes.analysis.channel_layouts`), carried
through batch norms, activations, pooling and depthwise convs to the convs/linears that
read them (``seg_in``/``seg_bn``/``seg_dw`` members). Pruning slices each reader at the
kept channels, rewrites split sizes, and turns a shuffle into an ``index_select`` of the
kept channels, so DenseNet/Inception/ShuffleNet-style models prune per producer.

Custom ops declare how they propagate channels with :func:`register_channel_rule`.
Anything else that touches a space (other reshapes, binary ops on split parts, the graph
outputs, ops this analysis does not know) marks it *unprunable*, so pruning never breaks
a model it does not understand; the result records why. Groups are the roots of the
union-find.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.passmgr.analysis import Analysis, register_analysis
from fxopt.ir.dialect import aten, is_conv, is_linear, module_path
from fxopt.ir.meta import size_expr
from fxopt.ir.rewrite_utils import arg, attr_tensor

from fxopt.passes.analysis.channel_layouts import (BN, COPIES, POOL, REDUCE, VIEWS, along_other_dim, concat, elementwise_unary,
                              split_or_shuffle, through_concat)

__all__ = ["ChannelGroup", "ChannelGroupsAnalysis", "channel_groups", "register_channel_rule", "CHANNEL_RULES"]

_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}


#: user-declared propagation rules: op -> "elementwise" | "join" | "opaque"
CHANNEL_RULES: dict = {}


def register_channel_rule(op, rule: str) -> None:
    """Declare how a custom op propagates channels, so pruning can see through it.

    * ``"elementwise"``: the output has the input's channels (one tensor input in a channel
      space; other inputs must not be per-channel): like an activation;
    * ``"join"``: all tensor inputs share their channels, the output too: like a residual add;
    * ``"opaque"``: channels reaching the op are kept whole (the default for unknown ops).

    ``op`` is an ``OpOverload`` or ``OpOverloadPacket`` (``torch.ops.mylib.scale``).

        >>> import torch
        >>> from fxopt.passes.analysis.dependency import register_channel_rule
        >>> register_channel_rule(torch.ops.aten.selu, "elementwise")
    """
    if rule not in ("elementwise", "join", "opaque"):
        from fxopt.errors import PipelineError
        raise PipelineError(f"channel rule must be elementwise, join or opaque, got {rule!r}")
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            CHANNEL_RULES[getattr(op, name)] = rule
    else:
        CHANNEL_RULES[op] = rule


@dataclass
class ChannelGroup:
    """One set of coupled channels: ``size`` channels, who produces and who consumes them."""

    size: int
    producers: list = field(default_factory=list)   # conv/linear nodes whose output channels these are
    members: list = field(default_factory=list)     # (kind, node, extra): see ChannelGroupsAnalysis
    reasons: list = field(default_factory=list)     # why unprunable, empty when prunable

    @property
    def blocks(self) -> int:
        """Channels must be kept in this many equal blocks (the groups of grouped convs), or 1."""
        import math
        b = 1
        for kind, _, extra in self.members:
            if kind in ("gconv", "gin", "gout"):
                b = b * extra // math.gcd(b, extra)
        return b

    @property
    def cuts(self) -> list[int]:
        """Boundaries of the blocks that must keep the same fraction of their channels.

        A grouped conv cuts the space into equal groups; a split that divides the space
        between its parts cuts it at each part's run of channels (so no part becomes empty).
        """
        cuts = {0, self.size}
        for kind, node, extra in self.members:
            if kind in ("gconv", "gin", "gout"):
                cuts |= set(range(0, self.size, self.size // extra))
            elif kind == "split":
                owners = []
                for part in extra[1]:
                    idx = sorted(i for g, size, start in part if g is self for i in range(start, start + size))
                    if idx:
                        owners.append(idx)
                if len(owners) > 1:
                    for idx in owners:
                        cuts |= {i for j, i in enumerate(idx) if j == 0 or idx[j - 1] != i - 1}
                        cuts |= {i + 1 for j, i in enumerate(idx) if j == len(idx) - 1 or idx[j + 1] != i + 1}
        return sorted(cuts)

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers)

    def describe(self) -> str:
        names = ", ".join(module_path(p) or p.name for p in self.producers)
        state = "prunable" if self.prunable else "kept: " + "; ".join(self.reasons[:2])
        unit = "heads" if any(k == "heads" for k, _, _ in self.members) else "channels"
        return f"{self.size} {unit} of [{names}] ({state})"


class _UF:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.size != gb.size:
            ga.reasons.append(f"joined with a space of {gb.size} channels")
        ga.producers += gb.producers
        ga.members += gb.members
        ga.reasons += gb.reasons
        self.parent[rb] = ra
        return ra

    def group(self, i: int) -> ChannelGroup:
        return self.groups[self.find(i)]


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of ``gm`` (see the module docstring)."""
    uf = _UF()
    space: dict[fx.Node, tuple[int, int, int]] = {}   # node -> (space id, channel dim, flatten factor)
    # concatenations: node -> (layout, channel dim); a layout is a shared list of [space id | None, size]
    # segments in channel order (None: channels no producer owns, e.g. the model input)
    segs: dict[fx.Node, tuple[list, int]] = {}
    splits: dict[fx.Node, tuple[list, int]] = {}   # split node -> (layouts of its parts, channel dim)
    layouts: list[list] = []

    def mark(node: fx.Node, why: str) -> None:
        if node in space:
            uf.group(space[node][0]).reasons.append(f"{why} at {node.name}")
        for layout in [segs[node][0]] if node in segs else splits[node][0] if node in splits else []:
            for sid in {e[0] for e in layout if e[0] is not None}:
                uf.group(sid).reasons.append(f"{why} at {node.name} (after a concatenation or split)")

    def seg_member(kind: str, node: fx.Node, extra: Any) -> None:
        layout = extra[0] if kind in ("split", "shuffle") else extra
        for sid in {e[0] for e in layout if e[0] is not None}:
            uf.group(sid).members.append((kind, node, extra))

    for node in gm.graph.nodes:
        if node.op == "output":
            for a in node.all_input_nodes:
                mark(a, "reaches the model output")
            continue
        if node.op != "call_function":
            continue
        t = node.target
        out = _val(node)
        if along_other_dim(node, space, uf) or \
                split_or_shuffle(node, space, segs, splits, layouts, seg_member, mark) or \
                concat(node, space, segs, layouts, mark) or through_concat(node, segs, seg_member, mark):
            continue
        ins = [a for a in node.all_input_nodes if a in space]
        if is_conv(node) or is_linear(node):
            x = node.args[0]
            w = attr_tensor(gm, node.args[1])
            if w is None or (is_conv(node) and t is not aten.conv2d.default and t is not aten.conv1d.default):
                for a in ins:
                    mark(a, f"read by {t}")
                continue
            groups = arg(node, 6, "groups", 1) if is_conv(node) else 1
            if x in space:
                sid, cdim, factor = space[x]
                want = 1 if is_conv(node) else (_val(x).dim() - 1 if isinstance(_val(x), torch.Tensor) else -1)
                if cdim != want:
                    mark(x, f"channel dim {cdim} read as features by {node.name}")
                elif groups == 1:
                    uf.group(sid).members.append(("in", node, factor))
                elif groups == int(w.shape[0]) and int(w.shape[1]) == 1 and factor == 1:
                    uf.group(sid).members.append(("dw", node, 1))   # depthwise: output space = input space
                    space[node] = (sid, 1, 1)
                    continue
                elif factor == 1 and int(w.shape[0]) == int(w.shape[1]) * groups == uf.group(sid).size:
                    # grouped C -> C conv: input and output share one space, pruned equally per group
                    uf.group(sid).members.append(("gconv", node, groups))
                    space[node] = (sid, 1, 1)
                    continue
                elif factor == 1 and int(w.shape[1]) * groups == uf.group(sid).size:
                    # grouped C_in -> C_out conv: inputs kept equally per group, columns gathered per group
                    uf.group(sid).members.append(("gin", node, groups))
                else:
                    mark(x, f"grouped conv {node.name}")
            if isinstance(out, torch.Tensor):
                sid = uf.new(int(w.shape[0]))
                uf.group(sid).producers.append(node)
                uf.group(sid).members.append(("out", node, 1))
                if groups > 1:   # its output rows come in groups too: keep the same number in each
                    uf.group(sid).members.append(("gout", node, groups))
                space[node] = (sid, 1 if is_conv(node) else out.dim() - 1, 1)
            continue
        if not ins:
            continue
        if t is BN and node.args[0] in space and space[node.args[0]][1] == 1:
            sid, cdim, f = space[node.args[0]]
            uf.group(sid).members.append(("bn", node, 1))
            space[node] = (sid, cdim, f)
            continue
        if t is operator.getitem and node.args[0] in space and node.args[0].target is BN and node.args[1] == 0:
            space[node] = space[node.args[0]]
            continue
        if t in (aten.layer_norm.default,) and node.args[0] in space:
            sid, cdim, f = space[node.args[0]]
            if isinstance(out, torch.Tensor) and cdim == out.dim() - 1 and len(node.args[1]) == 1 and f == 1:
                uf.group(sid).members.append(("ln", node, 1))
                space[node] = (sid, cdim, f)
            else:
                mark(node.args[0], "layer norm over other dims")
            continue
        if t in POOL and node.args[0] in space and space[node.args[0]][1] == 1:
            space[node] = space[node.args[0]]
            continue
        if t in REDUCE and node.args[0] in space:
            sid, cdim, f = space[node.args[0]]
            x = _val(node.args[0])
            dims = [d % x.dim() for d in node.args[1]] if isinstance(x, torch.Tensor) else []
            keep = bool(arg(node, 2, "keepdim", False))
            if f == 1 and dims and cdim not in dims:
                space[node] = (sid, cdim if keep else cdim - sum(d < cdim for d in dims), 1)
            else:
                mark(node.args[0], f"reduction {node.name}")
            continue
        if _heads(node, space, uf, mark):
            continue
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints):
            src = node.args[0]
            x, sid_c = _val(src), space.get(src)
            ok = False
            if sid_c is not None and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and \
                    sid_c[1] == 1 and out.dim() == 2 and x.dim() >= 2 and sid_c[2] == 1:
                spatial = [size_expr(s) for s in x.shape[2:]]
                if all(isinstance(s, int) for s in spatial) and size_expr(out.shape[1]) == \
                        int(size_expr(x.shape[1])) * int(torch.tensor(spatial).prod().item() if spatial else 1):
                    hw = int(torch.tensor(spatial).prod().item()) if spatial else 1
                    uf.group(sid_c[0]).members.append(("flatten", node, hw))
                    space[node] = (sid_c[0], 1, hw)
                    ok = True
            if not ok:
                for a in ins:
                    mark(a, f"reshape {node.name}")
            continue
        if t in _BINARY and len(ins) >= 1:
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(tensors) == 2 and all(a in space for a in tensors):
                (s1, c1, f1), (s2, c2, f2) = space[tensors[0]], space[tensors[1]]
                v1, v2 = _val(tensors[0]), _val(tensors[1])
                if f1 == f2 == 1 and v1.dim() - c1 == v2.dim() - c2:
                    sid = uf.union(s1, s2)
                    space[node] = (sid, c1 if v1.dim() >= v2.dim() else c2, 1)
                else:
                    mark(tensors[0], f"mismatched channel dims at {node.name}")
                    mark(tensors[1], f"mismatched channel dims at {node.name}")
                continue
            other = next((a for a in tensors if a not in space), None)
            src = ins[0]
            if other is not None:
                ov = _val(other)
                sid, cdim, f = space[src]
                sv = _val(src)
                # a tensor that broadcasts over the channel dim is fine (scalars, [N,1,H,W])
                lead = sv.dim() - ov.dim() if isinstance(ov, torch.Tensor) else 0
                k = cdim - lead
                if isinstance(ov, torch.Tensor) and 0 <= k < ov.dim() and size_expr(ov.shape[k]) != 1:
                    found = _per_channel_param(gm, node, other, k)
                    if found is None or f != 1:
                        mark(src, f"{node.name} mixes in a per-channel tensor")
                        continue
                    uf.group(sid).members.append(("pbias", node, found))
            space[node] = space[src]
            continue
        if elementwise_unary(t) and len(ins) == 1 and \
                isinstance(out, torch.Tensor) and isinstance(_val(ins[0]), torch.Tensor) and \
                tuple(out.shape) == tuple(_val(ins[0]).shape) and len(node.all_input_nodes) == 1:
            space[node] = space[ins[0]]
            continue
        if t is aten.permute.default and node.args[0] in space and space[node.args[0]][2] == 1 and \
                isinstance(out, torch.Tensor):   # channels-last blocks (ConvNeXt): the channel dim moves
            sid, cdim, _ = space[node.args[0]]
            space[node] = (sid, [d % out.dim() for d in node.args[1]].index(cdim), 1)
            continue
        if t in (aten.clone.default, aten.dropout.default, aten.contiguous.default, aten.alias.default):
            space[node] = space[ins[0]]
            continue
        rule = CHANNEL_RULES.get(t)
        if rule == "elementwise" and len(ins) == 1 and isinstance(out, torch.Tensor) and \
                isinstance(_val(ins[0]), torch.Tensor) and tuple(out.shape) == tuple(_val(ins[0]).shape):
            space[node] = space[ins[0]]
            continue
        if rule == "join" and isinstance(out, torch.Tensor) and \
                all(a in space and space[a][1:] == space[ins[0]][1:] for a in node.all_input_nodes
                    if isinstance(_val(a), torch.Tensor)):
            sid = space[ins[0]][0]
            for a in ins[1:]:
                sid = uf.union(sid, space[a][0])
            space[node] = (sid, *space[ins[0]][1:])
            continue
        for a in ins:
            mark(a, f"used by {getattr(t, '__name__', str(t))}")
    resolved = {}
    for layout in layouts:  # entries name their space ids: resolve them to the final groups
        for entry in layout:
            if isinstance(entry[0], int):
                entry[0] = resolved.setdefault(entry[0], uf.group(entry[0]))
    roots = sorted({uf.find(i) for i in range(len(uf.parent))})
    return [uf.groups[r] for r in roots if uf.groups[r].producers]


_SDPA = aten.scaled_dot_product_attention.default


def _per_channel_param(gm: fx.GraphModule, user: fx.Node, node: fx.Node, k: int) -> tuple | None:
    """A per-channel operand (channel dim ``k``) computed from one parameter: a layer scale
    ``gamma[C, 1, 1]``, or Swin's relative position bias ``table[index].view(N, N, -1).permute(2, 0, 1)
    .unsqueeze(0)``. Returns ``(reader, arg index, parameter dim, literal views)`` to slice the
    parameter by the kept channels, or None when the operand is anything else."""
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
    return reader, at, k, views


def _heads(node: fx.Node, space: dict, uf: "_UF", mark: Any) -> bool:
    """Attention heads: ``[B, T, H*D] -view-> [B, T, H, D] -transpose-> sdpa -> ... -> [B, T, H*D]``.

    At the split, a projection's space (only its producer so far) becomes a space of H heads
    whose producer rows come in blocks of D; transposes move the head dim; sdpa joins Q, K and
    V head by head; the merge back gives a space with flatten factor D (its reader slices
    column blocks). Literal head counts in these views are recorded to be rewritten.
    """
    t, out = node.target, _val(node)
    if not isinstance(out, torch.Tensor) or not node.args or node.args[0] not in space:
        return False
    src = node.args[0]
    sid, cdim, factor = space[src]
    x = _val(src)
    g = uf.group(sid)
    if t in VIEWS and isinstance(x, torch.Tensor):
        xs, os_ = [size_expr(d) for d in x.shape], [size_expr(d) for d in out.shape]
        # split: [..., E] -> [..., H, D] on a projection's output
        if factor == 1 and cdim == x.dim() - 1 and out.dim() == x.dim() + 1 and xs[:-1] == os_[:-2] and \
                isinstance(os_[-1], int) and isinstance(os_[-2], int) and os_[-1] > 1 and \
                os_[-2] * os_[-1] == g.size and len(g.members) == 1 and g.members[0][0] == "out" and \
                g.members[0][2] == 1:
            heads, dim = os_[-2], os_[-1]
            g.size = heads
            g.members[0] = ("out", g.members[0][1], dim)
            g.members.append(("heads", node, (out.dim() - 2, heads)))
            space[node] = (sid, out.dim() - 2, 1)
            return True
        # same-shape view (a literal head count): carry it
        if factor == 1 and xs == os_ and 0 < cdim < out.dim() - 1:
            g.members.append(("heads", node, (cdim, g.size)))
            space[node] = (sid, cdim, 1)
            return True
        # a view that moves the head dim and keeps the dims after it (Swin's window split of attention scores)
        tail = xs[cdim:]
        j = out.dim() - len(tail)
        if factor == 1 and any(m[0] == "heads" for m in g.members) and 0 <= j and os_[j:] == tail and \
                all(isinstance(d, int) for d in tail) and node.args[1][j] == g.size and j != cdim:
            g.members.append(("heads", node, (j, g.size)))
            space[node] = (sid, j, 1)
            return True
        # merge: [..., H, D] -> [..., H*D]
        if factor == 1 and cdim == x.dim() - 2 and out.dim() == x.dim() - 1 and xs[:-2] == os_[:-1] and \
                isinstance(xs[-1], int):
            g.members.append(("merge", node, (out.dim() - 1, xs[-1] * g.size)))
            space[node] = (sid, out.dim() - 1, int(xs[-1]))
            return True
        return False
    if t is aten.transpose.int and factor == 1:
        d0, d1 = (d % x.dim() for d in node.args[1:3])
        if x.dim() == 4 and cdim not in (d0, d1) and g.members and any(m[0] == "heads" for m in g.members):
            space[node] = (sid, cdim, 1)                       # k.transpose(-1, -2) keeps the head dim
            return True
        if cdim in (d0, d1) and x.dim() == 4 and cdim != x.dim() - 1 and x.dim() - 1 not in (d0, d1):
            space[node] = (sid, d1 if cdim == d0 else d0, 1)
            return True
        return False
    if t is aten.matmul.default and factor == 1 and cdim == 1 and x.dim() == 4 and out.dim() == 4:
        other = node.args[1]   # explicit attention: q @ k^T and softmax(scores) @ v share the heads
        if other in space and space[other][1:] == (1, 1) and isinstance(_val(other), torch.Tensor) and \
                _val(other).dim() == 4:
            space[node] = (uf.union(sid, space[other][0]), 1, 1)
            return True
        return False
    if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default) and \
            factor == 1 and node.args[1] % x.dim() != cdim:
        space[node] = (sid, cdim, 1)
        return True
    if t is _SDPA:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mv = _val(mask) if isinstance(mask, fx.Node) else None
        if all(a in space and space[a][1:] == (1, 1) for a in (q, k, v)) and x.dim() == 4 and \
                (mv is None or (isinstance(mv, torch.Tensor) and mv.dim() == 4 and size_expr(mv.shape[1]) == 1)) \
                and mask not in space and not node.kwargs.get("enable_gqa", False):
            sid = uf.union(uf.union(space[q][0], space[k][0]), space[v][0])
            space[node] = (sid, 1, 1)
            return True
        return False
    return False


@register_analysis
class ChannelGroupsAnalysis(Analysis):
    """The list of :class:`ChannelGroup` of the graph (see module docs)."""

    name = "channel-groups"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> list[ChannelGroup]:
        return channel_groups(gm)

    def same(self, cached: Any, fresh: Any, gm: fx.GraphModule) -> bool:
        return [g.describe() for g in cached] == [g.describe() for g in fresh]

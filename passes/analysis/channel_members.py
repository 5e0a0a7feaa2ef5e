"""What the ``channel-groups`` analysis hands to ``prune``: typed members of a channel group.

A :class:`ChannelGroup` is one set of coupled channels; its ``members`` say where those
channels live in the graph, one small frozen dataclass per coupling (after Torch-Pruning,
whose dependencies carry the pruning function of the layer they touch):

=====================  ===============================================================
member                 what pruning does to it (``keep``: the sorted kept channels)
=====================  ===============================================================
:class:`Produces`      a conv/linear's output rows (``block`` rows per channel: a head)
:class:`Reads`         a conv/linear's input columns (``block`` columns per channel)
:class:`Depthwise`     a depthwise conv's rows, and its ``groups``
:class:`GroupedConv`   a grouped ``C -> C`` conv: rows, and the kept inputs per group
:class:`GroupedInput`  a grouped conv reading the space: kept input columns per group
:class:`GroupedOutput` a grouped conv producing the space: equal channels per group
:class:`BatchNorm`     gamma, beta, mean, var
:class:`LayerNorm`     its normalized shape, weight and bias
:class:`FlattenSize`   the literal ``C * H * W`` of a flattening view
:class:`HeadCount`     the literal head count of an attention view
:class:`MergedSize`    the literal ``heads * head_dim`` of the merge view
:class:`ParamOperand`  a per-channel parameter mixed in (layer scale, position bias)
=====================  ===============================================================

Members that read a *layout* (channels of several groups, after a concatenation, split or
shuffle; :mod:`fxopt.passes.analysis.channel_layouts`) are rewritten once every group is
decided: :class:`LayoutReads`, :class:`LayoutNorm`, :class:`LayoutDepthwise`,
:class:`LayoutFlatten`, :class:`SplitSizes`, :class:`Shuffle`. A layout is a list of
:class:`Segment`.

Every member's ``prune`` edits only the graph module it is given; the analysis never calls
it. A channel rule for a custom op (:func:`fxopt.passes.analysis.dependency.register_channel_rule`)
may add its own member class: subclass :class:`Member` and implement ``prune``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.ir.dialect import module_path
from fxopt.ir.rewrite_utils import add_param, arg, attr_tensor

__all__ = ["ChannelGroup", "Segment", "Member", "slice_arg", "end_slicing", "LayoutMember", "Produces", "Reads", "Depthwise", "GroupedConv",
           "GroupedInput", "GroupedOutput", "BatchNorm", "LayerNorm", "FlattenSize", "ViewSize", "HeadCount", "MergedSize",
           "ParamOperand", "LayoutReads", "LayoutNorm", "LayoutDepthwise", "LayoutFlatten", "SplitSizes",
           "Shuffle", "layout_mask"]


@dataclass(eq=False)
class Segment:
    """``size`` channels ``start .. start + size - 1`` of ``group``: a space id while the analysis
    runs, the final :class:`ChannelGroup` after it, None for channels no producer owns."""

    group: Any
    size: int
    start: int = 0

    def copy(self) -> "Segment":
        return Segment(self.group, self.size, self.start)


# ---------------------------------------------------------------------------------- graph edits

def end_slicing(gm: fx.GraphModule) -> None:
    """Forget the slices :func:`slice_arg` shared (call when a prune is over)."""
    gm.meta.pop("fxopt_slices", None)


def _attrs(node: fx.Node, indices: tuple, dim: int) -> list[tuple[str, int]]:
    """(attribute, dim) of the get_attr arguments of ``node`` at ``indices``."""
    out = []
    for i in indices:
        a = node.args[i] if len(node.args) > i else None
        if isinstance(a, fx.Node) and a.op == "get_attr":
            out.append((a.target, dim))
    return out


def slice_arg(gm: fx.GraphModule, node: fx.Node, index: int, dim: int, keep: torch.Tensor,
              tag: str = "pruned") -> None:
    """Replace ``node.args[index]`` (a weight read) by its slice along ``dim``; buffers stay buffers.

    A parameter read by several nodes (a layer shared across depth) is sliced once: every read
    with the same slice gets the same new attribute (the cache lives in ``gm.meta`` while a prune
    runs; :func:`end_slicing` drops it)."""
    src = node.args[index]
    t = attr_tensor(gm, src)
    if t is None:
        return
    param = isinstance(t, torch.nn.Parameter)
    cache = gm.meta.setdefault("fxopt_slices", {})
    key = (src.target, dim, tag, tuple(keep.tolist())) if src.op == "get_attr" else None
    if key in cache and hasattr(gm, cache[key]):
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(cache[key])
    else:
        new = add_param(gm, f"{src.name}_{tag}", t.detach().index_select(dim, keep), node,
                        t.requires_grad if param else False, buffer=not param)
        if key is not None:
            cache[key] = new.target
    args = list(node.args)
    args[index] = new
    node.args = tuple(args)


def _slice_weight_and_bias(gm: fx.GraphModule, node: fx.Node, rows: torch.Tensor) -> None:
    slice_arg(gm, node, 1, 0, rows, "pruned")
    if arg(node, 2, "bias") is not None:
        slice_arg(gm, node, 2, 0, rows, "pruned")


def _gather_group_inputs(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor, groups: int, size: int) -> None:
    """A grouped conv keeps, for the rows of each group, the kept input channels of that group."""
    src = node.args[1]
    w = attr_tensor(gm, src)
    per_in, per_keep = size // groups, len(keep) // groups
    local = keep.view(groups, per_keep) - (torch.arange(groups) * per_in)[:, None]    # [groups, per_keep]
    cols = local.repeat_interleave(w.shape[0] // groups, dim=0)                       # [rows, per_keep]
    new_w = w.detach().gather(1, cols.reshape(*cols.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:]))
    new = add_param(gm, f"{src.name}_pruned", new_w, node, isinstance(w, torch.nn.Parameter) and w.requires_grad)
    args = list(node.args)
    args[1] = new
    node.args = tuple(args)


def _set_groups(node: fx.Node, groups: int) -> None:
    args = list(node.args)
    while len(args) < 7:
        args.append([1, 1] if len(args) in (3, 5) else [0, 0] if len(args) == 4 else 1)
    args[6] = groups
    node.args = tuple(args)


def _set_size(node: fx.Node, dim: int, old: int, new: int) -> None:
    """Rewrite the literal size ``old`` at ``dim`` of a view's shape argument to ``new``."""
    if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        sizes = list(node.args[1])
        if -len(sizes) <= dim < len(sizes) and sizes[dim] == old:
            sizes[dim] = new
            node.args = (node.args[0], sizes) + tuple(node.args[2:])


def _blocks(keep: torch.Tensor, block: int) -> torch.Tensor:
    """Indices of the ``block`` consecutive rows/columns of every kept channel."""
    return keep if block == 1 else (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------- members

@dataclass(frozen=True, eq=False)
class Member:
    """One place a channel group's channels live. ``node`` is the graph node it rewrites."""

    node: fx.Node
    kind: ClassVar[str] = "member"

    #: channels must be kept in this many equal blocks (grouped convs), or 1
    blocks: ClassVar[int] = 1

    def cuts(self, group: "ChannelGroup") -> set[int]:
        """Boundaries of blocks of the group that must keep the same fraction of their channels."""
        return set()

    def prune(self, gm: fx.GraphModule, group: "ChannelGroup", keep: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not say how to prune {self.node.name}")

    def params(self) -> list[tuple[str, int]]:
        """(attribute, dim) of every parameter this member slices by the group's channels: the
        analysis joins the groups slicing one shared parameter (:meth:`ChannelState.tie_shared_parameters`)."""
        return []

    def coarsened(self, m: int) -> "Member | None":
        """This member when each channel of its group becomes ``m`` consecutive channels (grouped-query
        attention: ``m`` query heads share one key/value head), or None when it cannot say."""
        return None


@dataclass(frozen=True, eq=False)
class Produces(Member):
    """A conv/linear whose output channels these are; ``block`` rows per channel (head_dim for heads)."""

    block: int = 1
    kind: ClassVar[str] = "out"

    def prune(self, gm, group, keep):
        _slice_weight_and_bias(gm, self.node, _blocks(keep, self.block))

    def params(self):
        return _attrs(self.node, (1, 2), 0)

    def coarsened(self, m):
        return replace(self, block=self.block * m)


@dataclass(frozen=True, eq=False)
class Reads(Member):
    """A conv/linear reading the channels; ``block`` input columns per channel (after a flatten)."""

    block: int = 1
    kind: ClassVar[str] = "in"

    def prune(self, gm, group, keep):
        slice_arg(gm, self.node, 1, 1, _blocks(keep, self.block), "pruned_in")

    def params(self):
        return _attrs(self.node, (1,), 1)

    def coarsened(self, m):
        return replace(self, block=self.block * m)


@dataclass(frozen=True, eq=False)
class Depthwise(Member):
    """A depthwise conv: its output space is its input space; rows and ``groups`` shrink with it."""

    kind: ClassVar[str] = "dw"

    def prune(self, gm, group, keep):
        _slice_weight_and_bias(gm, self.node, keep)
        _set_groups(self.node, len(keep))

    def params(self):
        return _attrs(self.node, (1, 2), 0)


@dataclass(frozen=True, eq=False)
class _Grouped(Member):
    groups: int = 1

    @property
    def blocks(self) -> int:   # type: ignore[override]
        return self.groups

    def cuts(self, group):
        return set(range(0, group.size, group.size // self.groups))


@dataclass(frozen=True, eq=False)
class GroupedConv(_Grouped):
    """A grouped ``C -> C`` conv (ResNeXt): input and output share the space, pruned equally per group."""

    kind: ClassVar[str] = "gconv"

    def prune(self, gm, group, keep):
        _slice_weight_and_bias(gm, self.node, keep)
        _gather_group_inputs(gm, self.node, keep, self.groups, group.size)


@dataclass(frozen=True, eq=False)
class GroupedInput(_Grouped):
    """A grouped ``C_in -> C_out`` conv reading the space: inputs kept equally per group."""

    kind: ClassVar[str] = "gin"

    def prune(self, gm, group, keep):
        _gather_group_inputs(gm, self.node, keep, self.groups, group.size)


@dataclass(frozen=True, eq=False)
class GroupedOutput(_Grouped):
    """A grouped conv producing the space: the same number of output rows in every group
    (its rows are sliced by its :class:`Produces` member)."""

    kind: ClassVar[str] = "gout"

    def prune(self, gm, group, keep):
        pass


@dataclass(frozen=True, eq=False)
class BatchNorm(Member):
    """gamma, beta, mean and var; ``block`` entries per channel (a norm before a head split)."""

    block: int = 1
    kind: ClassVar[str] = "bn"

    def prune(self, gm, group, keep):
        for i in (1, 2, 3, 4):
            if self.node.args[i] is not None:
                slice_arg(gm, self.node, i, 0, _blocks(keep, self.block), "pruned")

    def coarsened(self, m):
        return replace(self, block=self.block * m)

    def params(self):
        return _attrs(self.node, (1, 2, 3, 4), 0)


@dataclass(frozen=True, eq=False)
class LayerNorm(Member):
    """Its normalized shape, weight and bias; ``block`` entries per channel (a norm before a head split)."""

    block: int = 1
    kind: ClassVar[str] = "ln"

    def prune(self, gm, group, keep):
        args = list(self.node.args)
        args[1] = [len(keep) * self.block]
        self.node.args = tuple(args)
        for i in (2, 3):
            if len(self.node.args) > i and self.node.args[i] is not None:
                slice_arg(gm, self.node, i, 0, _blocks(keep, self.block), "pruned")

    def coarsened(self, m):
        return replace(self, block=self.block * m)

    def params(self):
        return _attrs(self.node, (2, 3), 0)


@dataclass(frozen=True, eq=False)
class FlattenSize(Member):
    """``[N, C, H, W] -> [N, C*H*W]``: ``block`` = H*W features per channel."""

    block: int = 1
    kind: ClassVar[str] = "flatten"

    def prune(self, gm, group, keep):
        n = self.node
        if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 2 and \
                isinstance(n.args[1][1], int):
            _set_size(n, 1, group.size * self.block, len(keep) * self.block)

    def coarsened(self, m):
        return replace(self, block=self.block * m)


@dataclass(frozen=True, eq=False)
class ViewSize(Member):
    """A view or expand with the literal channel count ``count`` at ``dim``; ``per`` entries per channel."""

    dim: int = 0
    count: int = 0
    per: int = 1
    kind: ClassVar[str] = "view"

    def prune(self, gm, group, keep):
        _set_size(self.node, self.dim, self.count, len(keep) * self.per)

    def coarsened(self, m):
        return replace(self, per=self.per * m)


@dataclass(frozen=True, eq=False)
class HeadCount(ViewSize):
    """A view with the literal head count ``count`` at ``dim``: ``per`` heads per channel of the group
    (a query-head group of grouped-query attention)."""

    kind: ClassVar[str] = "heads"


@dataclass(frozen=True, eq=False)
class MergedSize(Member):
    """The merge ``[..., H, D] -> [..., H*D]`` with the literal ``size`` = H*D at ``dim``."""

    dim: int = 0
    size: int = 0
    kind: ClassVar[str] = "merge"

    def prune(self, gm, group, keep):
        _set_size(self.node, self.dim, self.size, self.size // group.size * len(keep))

    def coarsened(self, m):
        return self


@dataclass(frozen=True, eq=False)
class ParamOperand(Member):
    """A per-channel operand computed from one parameter (``node`` mixes it in): ``reader.args[index]``
    is the parameter, sliced along ``dim``; ``views`` are ``(view node, dim)`` literal channel counts."""

    reader: fx.Node = None   # type: ignore[assignment]
    index: int = 0
    dim: int = 0
    views: tuple = ()
    per: int = 1
    kind: ClassVar[str] = "pbias"

    def prune(self, gm, group, keep):
        slice_arg(gm, self.reader, self.index, self.dim, _blocks(keep, self.per), "pruned")
        for view, d in self.views:
            sizes = list(view.args[1])
            sizes[d] = len(keep) * self.per
            view.args = (view.args[0], sizes) + tuple(view.args[2:])

    def coarsened(self, m):
        return replace(self, per=self.per * m)

    def params(self):
        return _attrs(self.reader, (self.index,), self.dim)


# ---------------------------------------------------------------------------------- layout readers

def layout_mask(layout: list[Segment], decided: dict) -> torch.Tensor:
    """Which channels of ``layout`` survive, given ``decided`` (id(group) -> sorted kept indices)."""
    full: dict[int, torch.Tensor] = {}
    parts = []
    for seg in layout:
        keep = decided.get(id(seg.group)) if seg.group is not None else None
        if keep is None:
            parts.append(torch.ones(seg.size, dtype=torch.bool))
            continue
        if id(seg.group) not in full:
            m = torch.zeros(seg.group.size, dtype=torch.bool)
            m[keep] = True
            full[id(seg.group)] = m
        parts.append(full[id(seg.group)][seg.start:seg.start + seg.size])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


@dataclass(frozen=True, eq=False)
class LayoutMember(Member):
    """A reader of a layout: rewritten after every group is decided (``prune_layout``)."""

    layout: list = field(default_factory=list)

    def segments(self) -> list[Segment]:
        """The segments naming the groups this member belongs to."""
        return self.layout

    def prune(self, gm, group, keep):
        pass   # nothing per group: see prune_layout

    def prune_layout(self, gm: fx.GraphModule, decided: dict) -> None:
        mask = layout_mask(self.layout, decided)
        if not bool(mask.all()):
            self.apply(gm, mask, mask.nonzero().flatten())

    def apply(self, gm: fx.GraphModule, mask: torch.Tensor, idx: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class LayoutReads(LayoutMember):
    """A conv/linear reading a concatenation: sliced at the kept channels of every segment."""

    kind: ClassVar[str] = "seg_in"

    def apply(self, gm, mask, idx):
        slice_arg(gm, self.node, 1, 1, idx, "pruned_in")


@dataclass(frozen=True, eq=False)
class LayoutNorm(LayoutMember):
    kind: ClassVar[str] = "seg_bn"

    def apply(self, gm, mask, idx):
        for i in (1, 2, 3, 4):
            if self.node.args[i] is not None:
                slice_arg(gm, self.node, i, 0, idx, "pruned")


@dataclass(frozen=True, eq=False)
class LayoutDepthwise(LayoutMember):
    kind: ClassVar[str] = "seg_dw"

    def apply(self, gm, mask, idx):
        _slice_weight_and_bias(gm, self.node, idx)
        _set_groups(self.node, len(idx))


@dataclass(frozen=True, eq=False)
class LayoutFlatten(LayoutMember):
    """A literal ``[N, C]`` view after global pooling of a concatenation."""

    kind: ClassVar[str] = "seg_flatten"

    def apply(self, gm, mask, idx):
        n = self.node
        if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 2:
            _set_size(n, 1, mask.numel(), len(idx))


@dataclass(frozen=True, eq=False)
class SplitSizes(LayoutMember):
    """A split/chunk of ``layout`` into ``parts``: its sizes become the kept counts of each part;
    a group divided between parts keeps the same fraction in each (so no part becomes empty)."""

    parts: tuple = ()
    kind: ClassVar[str] = "split"

    def cuts(self, group):
        cuts: set[int] = set()
        owners = []
        for part in self.parts:
            idx = sorted(i for s in part if s.group is group for i in range(s.start, s.start + s.size))
            if idx:
                owners.append(idx)
        if len(owners) > 1:
            for idx in owners:
                cuts |= {i for j, i in enumerate(idx) if j == 0 or idx[j - 1] != i - 1}
                cuts |= {i + 1 for j, i in enumerate(idx) if j == len(idx) - 1 or idx[j + 1] != i + 1}
        return cuts

    def prune_layout(self, gm, decided):
        node = self.node
        counts = [int(layout_mask(p, decided).sum()) for p in self.parts]
        if counts != [sum(s.size for s in p) for p in self.parts]:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], counts, dim), {}


@dataclass(frozen=True, eq=False)
class Shuffle(LayoutMember):
    """A channel shuffle ending at ``node``: ``layout`` (one segment per channel) is its input,
    ``perm`` the shuffled order, ``source`` the input node. Becomes an ``index_select`` of the kept
    channels in shuffled order."""

    perm: tuple = ()
    source: fx.Node = None   # type: ignore[assignment]
    kind: ClassVar[str] = "shuffle"

    def apply(self, gm, mask, idx):
        node = self.node
        pos = torch.cumsum(mask.long(), 0) - 1
        perm = torch.tensor(self.perm)
        order = pos[perm[mask[perm]]]
        index = add_param(gm, f"{node.name}_order", order, node)
        with gm.graph.inserting_before(node):
            gather = gm.graph.call_function(torch.ops.aten.index_select.default, (self.source, 1, index))
        gather.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(gather)


# ---------------------------------------------------------------------------------- groups

@dataclass
class ChannelGroup:
    """One set of coupled channels: ``size`` channels, who produces and who consumes them."""

    size: int
    producers: list = field(default_factory=list)   # conv/linear nodes whose output channels these are
    members: list = field(default_factory=list)     # Member instances (see the module docs)
    reasons: list = field(default_factory=list)     # why unprunable, empty when prunable

    @property
    def blocks(self) -> int:
        """Channels must be kept in this many equal blocks (the groups of grouped convs), or 1."""
        b = 1
        for m in self.members:
            b = b * m.blocks // math.gcd(b, m.blocks)
        return b

    @property
    def cuts(self) -> list[int]:
        """Boundaries of the blocks that must keep the same fraction of their channels.

        A grouped conv cuts the space into equal groups; a split that divides the space
        between its parts cuts it at each part's run of channels (so no part becomes empty).
        """
        cuts = {0, self.size}
        for m in self.members:
            cuts |= m.cuts(self)
        return sorted(cuts)

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers)

    @property
    def heads(self) -> bool:
        """Whether these are attention heads (pruned whole)."""
        return any(isinstance(m, HeadCount) for m in self.members)

    def of(self, kind: type) -> list:
        """The members of one class, e.g. ``group.of(Produces)``."""
        return [m for m in self.members if isinstance(m, kind)]

    def describe(self) -> str:
        names = ", ".join(module_path(p) or p.name for p in self.producers)
        state = "prunable" if self.prunable else "kept: " + "; ".join(self.reasons[:2])
        return f"{self.size} {'heads' if self.heads else 'channels'} of [{names}] ({state})"

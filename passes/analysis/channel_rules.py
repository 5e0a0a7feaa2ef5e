"""How ops move channels: one :class:`ChannelRule` per op kind, in a registry.

The ``channel-groups`` analysis (:mod:`fxopt.passes.analysis.dependency`) walks the graph
once and asks, for every node, the rules registered for its target (then the rules that
match by predicate, like "any conv or linear"), in three phases:

1. ``layout``: ops that build or read *layouts* (concatenations, splits, shuffles;
   :mod:`fxopt.passes.analysis.channel_layouts`);
2. ``producer``: convs and linears, which open a channel space whether or not they read one;
3. ``space``: everything else that reads a channel space (norms, activations, views,
   attention, residual adds, ...), only when the node reads one.

The first rule that returns True has handled the node; a node no rule handles marks every
channel reaching it unprunable (the safe default). A rule is a small object with a
``__call__(node, state) -> bool``; the :class:`ChannelState` it gets holds the union-find of
channel spaces and the maps from nodes to the channels they carry.

Custom ops declare their rule with :func:`register_channel_rule`: a name
(``"elementwise"``, ``"join"``, ``"opaque"``) or a :class:`ChannelRule` of their own. A user
rule for an op is asked before the built-in ones.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.fx as fx

from fxopt.errors import PipelineError
from fxopt.passes.analysis.channel_members import ChannelGroup, LayoutMember, Member, Segment

__all__ = ["Channels", "ChannelState", "ChannelRule", "ElementwiseRule", "JoinRule", "OpaqueRule",
           "register_channel_rule", "register_builtin", "rules_for", "apply_rules", "CHANNEL_RULES", "PHASES"]

PHASES = ("layout", "producer", "space")


class Channels(NamedTuple):
    """The channels a tensor carries: space ``sid`` along dim ``dim``; each channel is ``factor``
    consecutive features along that dim (after flattening ``[N, C, H, W]`` or merging heads)."""

    sid: int
    dim: int
    factor: int = 1


class ChannelState:
    """What the analysis knows while it walks the graph (see :mod:`...channel_rules`)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.space: dict[fx.Node, Channels] = {}
        # node -> (layout, channel dim): a tensor whose channels come from several spaces
        self.segs: dict[fx.Node, tuple[list[Segment], int]] = {}
        self.splits: dict[fx.Node, tuple[list, int]] = {}   # split node -> (layouts of its parts, dim)
        self.layouts: list[list[Segment]] = []               # every layout, resolved to groups at the end

    # union-find over channel spaces
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

    def group(self, sid: int) -> ChannelGroup:
        return self.groups[self.find(sid)]

    def coarsen(self, sid: int, m: int) -> str | None:
        """Make every ``m`` consecutive channels of ``sid``'s group one channel (the query heads that
        share a key/value head): members and the factor of every tensor carrying it follow.
        Returns why it cannot, or None."""
        root = self.find(sid)
        g = self.groups[root]
        if m == 1:
            return None
        if g.size % m:
            return f"{g.size} heads do not split into groups of {m}"
        if any(isinstance(seg.group, int) and self.find(seg.group) == root for lay in self.layouts for seg in lay):
            return "its channels are concatenated or split"
        members = [mem.coarsened(m) for mem in g.members]
        bad = next((mem for mem, c in zip(g.members, members) if c is None), None)
        if bad is not None:
            return f"{type(bad).__name__} at {bad.node.name} cannot keep groups of {m}"
        g.members[:] = members
        g.size //= m
        for node, ch in self.space.items():
            if self.find(ch.sid) == root:
                self.space[node] = Channels(ch.sid, ch.dim, ch.factor * m)
        return None

    def join_units(self, parts: list[tuple[int, int]]) -> tuple[int | None, int, str]:
        """Join spaces whose channels cover ``unit`` positions each of a common axis (``parts``:
        ``(sid, unit)``; grouped-query attention: a key/value head covers the query heads it serves):
        the finer ones are coarsened to the coarsest unit first. Returns (sid, unit, why not)."""
        unit = max(u for _, u in parts)
        roots: dict[int, int] = {}
        for sid, u in parts:
            if unit % u:
                return None, unit, f"head groups of {u} and {unit} do not nest"
            r = self.find(sid)
            if roots.setdefault(r, u) != u:
                return None, unit, "one space joined with itself at another grouping"
        for r, u in roots.items():
            why = self.coarsen(r, unit // u)
            if why:
                return None, unit, why
        sid = parts[0][0]
        for other, _ in parts[1:]:
            sid = self.union(sid, other)
        return sid, unit, ""

    # helpers for rules
    @staticmethod
    def val(n: Any) -> Any:
        """The fake value of a node (None for non-nodes)."""
        return n.meta.get("val") if isinstance(n, fx.Node) else None

    def ins(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that carry a channel space."""
        return [a for a in node.all_input_nodes if a in self.space]

    def carry(self, node: fx.Node, src: fx.Node) -> bool:
        """``node`` carries ``src``'s channels unchanged."""
        self.space[node] = self.space[src]
        return True

    def add(self, sid: int, member: Member) -> None:
        self.group(sid).members.append(member)

    def add_layout(self, member: LayoutMember) -> None:
        """A reader of a layout belongs to every group with channels in it."""
        for sid in {s.group for s in member.segments() if s.group is not None}:
            self.group(sid).members.append(member)

    def mark(self, node: fx.Node, why: str) -> None:
        """Every channel ``node`` carries stays whole (``why`` is recorded in the group)."""
        if node in self.space:
            self.group(self.space[node].sid).reasons.append(f"{why} at {node.name}")
        layouts = [self.segs[node][0]] if node in self.segs else self.splits[node][0] if node in self.splits else []
        for layout in layouts:
            for sid in {s.group for s in layout if s.group is not None}:
                self.group(sid).reasons.append(f"{why} at {node.name} (after a concatenation or split)")

    def mark_all(self, node: fx.Node, nodes: Any = None) -> bool:
        for a in (self.ins(node) if nodes is None else nodes):
            self.mark(a, f"used by {getattr(node.target, '__name__', str(node.target))}")
        return True

    def tie_shared_parameters(self) -> None:
        """A parameter used by several ops (ALBERT's one layer applied at every depth, tied
        weights) is sliced once for all of them: the spaces whose members slice the same parameter
        along the same dim become one group, so every use keeps the same channels."""
        owner: dict[tuple, int] = {}
        for i in range(len(self.parent)):
            if self.find(i) != i:
                continue
            for m in list(self.groups[i].members):
                for target, dim in m.params():
                    j = owner.setdefault((target, dim), i)
                    if self.find(j) != self.find(i):
                        self.union(j, i)

    def result(self) -> list[ChannelGroup]:
        self.tie_shared_parameters()
        resolved: dict[int, ChannelGroup] = {}
        for layout in self.layouts:  # segments name their space ids: resolve them to the final groups
            for seg in layout:
                if isinstance(seg.group, int):
                    seg.group = resolved.setdefault(seg.group, self.group(seg.group))
        roots = sorted({self.find(i) for i in range(len(self.parent))})
        return [self.groups[r] for r in roots if self.groups[r].producers]


class ChannelRule:
    """How one op kind moves channels. ``ops``: the targets it handles (empty: ``matches``
    decides for any node); ``phase``: one of :data:`PHASES`. Return True when handled."""

    ops: ClassVar[Any] = ()
    phase: ClassVar[str] = "space"
    name: str = ""

    def matches(self, node: fx.Node) -> bool:
        return True

    def __call__(self, node: fx.Node, st: ChannelState) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<channel rule {self.name or type(self).__name__}>"


class ElementwiseRule(ChannelRule):
    """The output has the input's channels (one tensor input in a space, same shape)."""

    name = "elementwise"

    def __call__(self, node, st):
        ins, out = st.ins(node), st.val(node)
        if len(ins) == 1 and isinstance(out, torch.Tensor) and isinstance(st.val(ins[0]), torch.Tensor) and \
                tuple(out.shape) == tuple(st.val(ins[0]).shape):
            return st.carry(node, ins[0])
        return False


class JoinRule(ChannelRule):
    """All tensor inputs share their channels, and the output has them (a residual add)."""

    name = "join"

    def __call__(self, node, st):
        ins = st.ins(node)
        if not isinstance(st.val(node), torch.Tensor) or \
                not all(a in st.space and st.space[a][1:] == st.space[ins[0]][1:] for a in node.all_input_nodes
                        if isinstance(st.val(a), torch.Tensor)):
            return False
        sid = st.space[ins[0]].sid
        for a in ins[1:]:
            sid = st.union(sid, st.space[a].sid)
        st.space[node] = Channels(sid, *st.space[ins[0]][1:])
        return True


class OpaqueRule(ChannelRule):
    """Channels reaching the op are kept whole."""

    name = "opaque"

    def __call__(self, node, st):
        return st.mark_all(node)


_NAMED = {"elementwise": ElementwiseRule, "join": JoinRule, "opaque": OpaqueRule}

#: user-declared rules: op overload -> rule (asked before the built-in rules of that op)
CHANNEL_RULES: dict = {}

# built-in rules: phase -> (target -> [rules]), and rules matching by predicate
_BY_OP: dict[str, dict[Any, list[ChannelRule]]] = {p: {} for p in PHASES}
_ANY: dict[str, list[ChannelRule]] = {p: [] for p in PHASES}


def register_channel_rule(op: Any, rule: "str | ChannelRule") -> None:
    """Declare how a custom op propagates channels, so pruning can see through it.

    * ``"elementwise"``: the output has the input's channels (one tensor input in a channel
      space; other inputs must not be per-channel): like an activation;
    * ``"join"``: all tensor inputs share their channels, the output too: like a residual add;
    * ``"opaque"``: channels reaching the op are kept whole (the default for unknown ops);
    * a :class:`ChannelRule` instance: your own propagation (and members, see
      :mod:`fxopt.passes.analysis.channel_members`).

    ``op`` is an ``OpOverload`` or ``OpOverloadPacket`` (``torch.ops.mylib.scale``).

        >>> import torch
        >>> from fxopt.passes.analysis.dependency import register_channel_rule
        >>> register_channel_rule(torch.ops.aten.selu, "elementwise")
    """
    if isinstance(rule, str):
        if rule not in _NAMED:
            raise PipelineError(f"channel rule must be elementwise, join, opaque or a ChannelRule, got {rule!r}")
        rule = _NAMED[rule]()
    elif not isinstance(rule, ChannelRule):
        raise PipelineError(f"channel rule must be elementwise, join, opaque or a ChannelRule, got {rule!r}")
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            CHANNEL_RULES[getattr(op, name)] = rule
    else:
        CHANNEL_RULES[op] = rule


def register_builtin(cls: type) -> type:
    """Class decorator: add a built-in rule (after the ones registered before it)."""
    rule = cls()
    if rule.phase not in PHASES:
        raise PipelineError(f"channel rule {cls.__name__}: phase must be one of {PHASES}")
    if rule.ops:
        for op in rule.ops:
            _BY_OP[rule.phase].setdefault(op, []).append(rule)
    else:
        _ANY[rule.phase].append(rule)
    return cls


def rules_for(node: fx.Node, phase: str) -> list[ChannelRule]:
    """The rules asked about ``node`` in ``phase``, in order."""
    t = node.target
    user = [CHANNEL_RULES[t]] if phase == "space" and t in CHANNEL_RULES else []
    return user + _BY_OP[phase].get(t, []) + [r for r in _ANY[phase] if r.matches(node)]


def apply_rules(node: fx.Node, st: ChannelState, phase: str) -> bool:
    return any(rule(node, st) for rule in rules_for(node, phase))


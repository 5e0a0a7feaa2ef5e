"""Lowering rules: which kernel replaces which pattern, on which device.

A rule is data (:class:`LoweringRule`): a name, the pass family that applies it (``quant`` for
``lower-quant``, ``sparse`` for ``lower-sparse``), the ATen op its pattern is rooted at, the
device types it runs on, the kernel it emits, a matcher (node -> match object, shared by the
rules of one family), a condition on the match and a builder that rewrites the graph. A
lowering pass finds the graph's device (:func:`graph_device`: its parameters', else its
inputs'), and for each node takes the first rule of :data:`LOWERING_RULES`, in order, whose
device, op, matcher and condition accept it (:func:`first_rule`). A device's kernels add rows
(:func:`register_lowering`), not branches in a pass::

    >>> from fxopt.passes.lower.rules import LOWERING_RULES, rules_for
    >>> [r.name for r in rules_for("quant", "cpu", torch.ops.aten.linear.default)]
    ['linear_int8', 'linear_int8_dynamic', 'linear_wq']
    >>> [r.name for r in rules_for("quant", "cuda", torch.ops.aten.linear.default)]  # Triton kernels
    ['linear_int8_gpu', 'linear_int8_dynamic_gpu', 'linear_wq_gpu']

The table, in priority order (:func:`table` renders it; a test keeps this copy in step):

=======================  ========  =================================================  ==================================
rule                     device    pattern                                            kernel
=======================  ========  =================================================  ==================================
linear_int8              cpu       ``linear(dq(q(x, s, z)), dq(W8), b)``              ``fxopt::linear_int8``
linear_int8_dynamic      cpu       ``linear(dq(q(x, dynamic_scale(x))), dq(W8), b)``  ``fxopt::linear_int8_dynamic``
conv2d_int8              cpu       ``q(relu?(conv2d(dq(q(x)), dq(W8), b))) then dq``  ``fxopt::conv2d_int8``
linear_wq                cpu       ``linear(x, dq(Wq), b)``                           ``fxopt::linear_wq``
conv2d_wq                cpu       ``conv2d(x, dq(Wq), b)``                           ``fxopt::conv2d_wq``
embedding_wq             cpu,cuda  ``embedding(dq(Wq), ids)``                         ``fxopt::embedding_wq``
quantize_dequantize      cpu       ``dq(q(x, s, z)) read by float ops``               ``fxopt::quantize_dequantize``
linear_csr               cpu       ``linear(x, W, b), W mostly zeros``                ``fxopt::linear_csr``
linear_int8_gpu          cuda      ``act?(linear(dq(q(x, s, z)), dq(W8), b))``        ``fxopt::linear_int8_gpu``
linear_int8_dynamic_gpu  cuda      ``act?(linear(dq(q(x, dyn(x))), dq(W8), b))``      ``fxopt::linear_int8_dynamic_gpu``
linear_wq_gpu            cuda      ``linear(x, dq(Wq), b)``                           ``fxopt::linear_wq_gpu``
linear_24_gpu            cuda      ``linear(x, W, b), W 2:4 sparse``                  ``fxopt::linear_24_gpu``
linear_bsr_gpu           cuda      ``linear(x, W, b), W mostly zero blocks``          ``fxopt::linear_bsr_gpu``
=======================  ========  =================================================  ==================================

``x`` is a float activation (not itself dequantized), ``dq(q(x, s, z))`` a static activation
(unsigned codes, calibrated scale), ``W8`` stored int8 codes whose annotation
(:class:`~fxopt.quant.annotation.QuantAnnotation`) says signed, symmetric, per channel, at
most 8 bits (the int8 x int8 engines, fbgemm and oneDNN), ``Wq`` any stored int8 or int4
codes (weight-only; int4 codes are packed two per byte for linears and embeddings). The quant
rules read the layer's typed annotation; the form of its activation is read from the graph,
since one quantize node serves every consumer of a tensor. ``quantize_dequantize`` takes what
the layer rules leave: a static ``dq(q(x))`` that no quantized layer reads any more (a ResNet
identity going into its residual add), fused into one op (``lower-quant`` applies it in a
second sweep, after the layers took their inputs). Rules applied under a pass's policy
(``lower-sparse``'s ``max_density``) see only the layers the policy admits.

Adding a kernel for a new device is one row here (with its condition and builder) and one
kernel file in :mod:`fxopt.kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import fxopt.kernels.cpu_quant  # noqa: F401  (registers the int8 kernels)
import fxopt.kernels.cpu_sparse  # noqa: F401  (registers fxopt::linear_csr)
import fxopt.quant.qops  # noqa: F401  (registers quantize/dequantize)
from fxopt.ir.dialect import RELU_OPS, arg, aten
from fxopt.ir.rewrite_utils import attr_tensor, copy_meta
from fxopt.kernels import cpu_isa
from fxopt.kernels.cpu_quant import pack_int4, weight_bits
from fxopt.kernels.cpu_sparse import to_csr
from fxopt.quant.annotation import QuantAnnotation

__all__ = ["LoweringRule", "LOWERING_RULES", "register_lowering", "rules_for", "first_rule", "graph_device",
           "table", "QuantMatch", "match_quant", "QDQMatch", "match_qdq", "SparseMatch", "match_sparse"]

fxq = torch.ops.fxopt
_Q, _DQ, _DYN = fxq.quantize.default, fxq.dequantize.default, fxq.dynamic_scale.default


def _always(match: Any) -> bool:
    return True


@dataclass(frozen=True)
class LoweringRule:
    """One row of the table: ``match(gm, node, config)`` -> match or None; ``when(match)`` -> bool;
    ``build(match, rule)`` rewrites the graph (emitting ``rule.kernel``) and returns the kind the
    pass records (``linear_int8``, ``embedding_int4`` ...)."""

    name: str
    family: str
    op: Any
    devices: tuple
    kernel: Any
    pattern: str
    match: Callable[..., Any]
    build: Callable[[Any, "LoweringRule"], str]
    when: Callable[[Any], bool] = _always

    def __post_init__(self) -> None:
        devices = (self.devices,) if isinstance(self.devices, str) else tuple(self.devices)
        object.__setattr__(self, "devices", devices)
        if not self.name or not devices or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(f"lowering rule {self.name!r}: needs a name and device types ('cpu', 'cuda'), "
                             f"got devices={self.devices!r}")
        if not all(callable(f) for f in (self.match, self.when, self.build)):
            raise ValueError(f"lowering rule {self.name!r}: match, when and build must be functions")

    @property
    def kernel_name(self) -> str:
        schema = getattr(self.kernel, "_schema", None)
        return schema.name if schema is not None else getattr(self.kernel, "__name__", str(self.kernel))


#: every rule, in priority order (the registry; add rows with register_lowering)
LOWERING_RULES: list[LoweringRule] = []


def register_lowering(rule: LoweringRule, before: str | None = None) -> LoweringRule:
    """Add ``rule`` to the table (last, or just before the rule named ``before``, to take priority).

    A new device's kernel module needs no change to any pass: its rows name the device, and the
    lowering passes pick them for graphs whose tensors live there.
    """
    names = [r.name for r in LOWERING_RULES]
    if rule.name in names:
        raise ValueError(f"a lowering rule named {rule.name!r} exists; pick another name")
    if before is not None and before not in names:
        raise ValueError(f"register_lowering(before={before!r}): no such rule; rules are {', '.join(names)}")
    LOWERING_RULES.insert(names.index(before) if before is not None else len(LOWERING_RULES), rule)
    return rule


def rules_for(family: str, device: str, op: Any = None) -> list[LoweringRule]:
    """The rules of ``family`` for ``device`` (and rooted at ``op``), in priority order."""
    return [r for r in LOWERING_RULES if r.family == family and device in r.devices and (op is None or r.op is op)]


def first_rule(gm: fx.GraphModule, node: fx.Node, family: str, device: str, config: Any,
               known: dict | None = None) -> tuple[LoweringRule, Any] | None:
    """The first rule that accepts ``node``, with its match (each matcher runs once; ``known`` holds
    matches the caller already has, by matcher)."""
    matches = dict(known or {})
    for rule in rules_for(family, device, node.target):
        if rule.match not in matches:
            matches[rule.match] = rule.match(gm, node, config)
        m = matches[rule.match]
        if m is not None and rule.when(m):
            return rule, m
    return None


def graph_device(gm: fx.GraphModule, args: Any = ()) -> str:
    """The device type the graph runs on: its parameters' and buffers', else its inputs', else cpu."""
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device.type
    for a in pytree.tree_leaves(args):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def table(family: str | None = None) -> str:
    """The rules (of ``family``) as the reST table of the module docs."""
    rows = [("rule", "device", "pattern", "kernel")] + [
        (r.name, ",".join(r.devices), f"``{r.pattern}``", f"``{r.kernel_name}``")
        for r in LOWERING_RULES if family is None or r.family == family]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    line = "  ".join("=" * w for w in widths)
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line, fmt(rows[0]), line, *map(fmt, rows[1:]), line])


# ---------------------------------------------------------------- quant: matching
@dataclass
class _W:
    q: fx.Node
    scale: fx.Node
    zp: fx.Node
    group_size: int  # of the stored codes (the kernels' argument)


@dataclass
class QuantMatch:
    """A linear, conv2d or embedding whose weight is ``dq`` of stored int8 codes."""

    gm: fx.GraphModule
    node: fx.Node
    x: Any  # the input (the indices of an embedding)
    w: _W
    ann: QuantAnnotation
    act: tuple | None  # ('static', x, (scale, zp, qmax)), ('dynamic', x, qmax) or None
    bias: Any
    pack_int4: bool
    conv: tuple | None = None  # (stride, padding, dilation, groups) of a conv2d with numeric padding
    config: Any = None  # the lowering pass's config (the CUDA rules read its decline policy)

    @property
    def int4(self) -> bool:
        """Signed codes of at most 4 bits: stored two per byte when packing."""
        return self.ann.weight.signed and self.ann.bits <= 4

    @property
    def int8_channel(self) -> bool:
        """Weights the int8 x int8 engines take: symmetric, per channel, 5..8 bits."""
        return not self.int4 and self.ann.symmetric and self.ann.group_size == 0

    @property
    def x_is_dq(self) -> bool:
        return isinstance(self.x, fx.Node) and self.x.target is _DQ

    def kind(self, want: str) -> bool:
        return self.act is not None and self.act[0] == want


def _weight(gm: fx.GraphModule, node: Any) -> _W | None:
    """``dq(get_attr q, get_attr s, get_attr z, g)`` of a stored int8 weight."""
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q, s, z, g = node.args
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (q, s, z)):
        return None
    qt, zt = attr_tensor(gm, q), attr_tensor(gm, z)
    if qt is None or zt is None or qt.dtype != torch.int8:
        return None
    return _W(q, s, z, g)


def _activation(gm: fx.GraphModule, node: Any) -> tuple[str, fx.Node, Any] | None:
    """('static', x, (scale, zp, qmax)) or ('dynamic', x, qmax) for ``dq(q(x, ...))``.

    Static codes are unsigned ``0..qmax`` (qmax 255, or 127 where the CPU needs 7 bits);
    dynamic ones symmetric ``-qmax..qmax`` with a run-time per-row scale.
    """
    if not (isinstance(node, fx.Node) and node.target is _DQ):
        return None
    q = node.args[0]
    if not (isinstance(q, fx.Node) and q.target is _Q):
        return None
    x, s, z, qmin, qmax, g = q.args
    if g:
        return None
    if isinstance(s, fx.Node) and s.target is _DYN:
        if qmin == -qmax and 1 <= qmax <= 127 and s.args[1] == qmax and s.args[0] is x:
            return "dynamic", x, qmax
        return None
    st, zt = attr_tensor(gm, s), attr_tensor(gm, z)
    if st is None or zt is None or st.numel() != 1 or qmin != 0 or not 1 <= qmax <= 255:
        return None
    return "static", x, (float(st), int(zt), int(qmax))


def _pair(v: Any) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == 2 else (v[0], v[0])
    return (v, v)


def _conv_params(node: fx.Node) -> tuple | None:
    padding = arg(node, 4, "padding", 0)
    if isinstance(padding, str):
        return None
    return (list(_pair(arg(node, 3, "stride", 1))), list(_pair(padding)), list(_pair(arg(node, 5, "dilation", 1))),
            arg(node, 6, "groups", 1))


def match_quant(gm: fx.GraphModule, node: fx.Node, config: Any) -> QuantMatch | None:
    """The quant rules' matcher (``config.pack_int4``: store int4 codes two per byte)."""
    embedding = node.target is aten.embedding.default
    x, w_node = (node.args[1], node.args[0]) if embedding else (node.args[0], node.args[1])
    w = _weight(gm, w_node)
    if w is None:
        return None  # (an embedding's padding_idx and the other options only matter for gradients)
    # graphs saved before annotations were kept through fxopt.save have none: infer them from the codes
    ann = QuantAnnotation.of(node) or QuantAnnotation.inferred(attr_tensor(gm, w.zp), w.group_size)
    return QuantMatch(gm, node, x, w, ann, None if embedding else _activation(gm, x),
                      None if embedding else arg(node, 2, "bias"), bool(getattr(config, "pack_int4", True)),
                      _conv_params(node) if node.target is aten.conv2d.default else None, config)


# ---------------------------------------------------------------- quant: building
def _replace(gm: fx.GraphModule, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    copy_meta(new, old)
    QuantAnnotation.carry(new, old)
    old.replace_all_uses_with(new)
    name = old.name
    gm.graph.erase_node(old)
    new._rename(name)  # the kernel keeps the layer's node name (fxopt.diff shows it as retyped)
    return new


def _wargs(m: QuantMatch) -> tuple:
    """Weight arguments of the weight-only kernels: (codes, scale, zero point, group size, bits)."""
    packed = m.int4 and m.pack_int4
    q = m.w.q
    if packed:  # a packed uint8 copy of the int4 codes stored as int8 (cached per weight)
        packed_name = str(m.w.q.target) + "_packed"
        owner, _, attr = packed_name.rpartition(".")
        mod = m.gm.get_submodule(owner) if owner else m.gm
        if not hasattr(mod, attr):
            mod.register_buffer(attr, pack_int4(attr_tensor(m.gm, m.w.q)))
        with m.gm.graph.inserting_before(m.w.q):
            q = m.gm.graph.get_attr(packed_name)
    return q, m.w.scale, m.w.zp, m.w.group_size, 4 if packed else 8


def _bits(qmax: int, dynamic: bool) -> int:
    return 8 if qmax > (63 if dynamic else 127) else 7


def _engine(kind: str, bits: int, shape: tuple, w_q: torch.Tensor) -> str:
    """The first CPU engine exact for ``bits``-wide codes and these weights (``check_layers`` of
    ``lower-quant`` may pick a faster exact one)."""
    return cpu_isa.plan(kind, bits, "", shape, weight_bits(w_q)) or "fbgemm"


def _build_embedding_wq(m: QuantMatch, rule: LoweringRule) -> str:
    q, s, z, g, b = _wargs(m)
    _replace(m.gm, m.node, rule.kernel, (q, m.x, s, z, g, b))
    return f"embedding_int{b}"


def _build_linear_int8_dynamic(m: QuantMatch, rule: LoweringRule) -> str:
    qmax, w_q = m.act[2], attr_tensor(m.gm, m.w.q)
    engine = _engine("linear", _bits(qmax, True), tuple(w_q.shape), w_q)
    _replace(m.gm, m.node, rule.kernel, (m.act[1], m.w.q, m.w.scale, m.bias, qmax, engine))
    return rule.name


def _build_linear_int8(m: QuantMatch, rule: LoweringRule) -> str:
    (s, z, qmax), w_q = m.act[2], attr_tensor(m.gm, m.w.q)
    engine = _engine("linear", _bits(qmax, False), tuple(w_q.shape), w_q)
    _replace(m.gm, m.node, rule.kernel, (m.act[1], m.w.q, m.w.scale, m.bias, s, z, qmax, engine))
    return rule.name


def _build_linear_wq(m: QuantMatch, rule: LoweringRule) -> str:
    q, s, z, g, b = _wargs(m)
    _replace(m.gm, m.node, rule.kernel, (m.x, q, s, z, m.bias, g, b))
    return f"linear_int{b}_weight"


def _build_conv2d_wq(m: QuantMatch, rule: LoweringRule) -> str:
    _replace(m.gm, m.node, rule.kernel, (m.x, m.w.q, m.w.scale, m.w.zp, m.bias, *m.conv))
    return "conv2d_int8_weight"


def _conv_output(m: QuantMatch) -> tuple | None:
    """(out, relu, q_out, dq users) when the conv's output (after an only-user ReLU) is quantized, unsigned."""
    out, relu = m.node, False
    if len(m.node.users) == 1:
        u = next(iter(m.node.users))
        if u.op == "call_function" and u.target in RELU_OPS:
            out, relu = u, True
    if len(out.users) != 1:
        return None
    q_out = next(iter(out.users))
    if q_out.target is not _Q or q_out.args[3] != 0 or q_out.args[5] != 0 or not 1 <= q_out.args[4] <= 255:
        return None
    so, zo = attr_tensor(m.gm, q_out.args[1]), attr_tensor(m.gm, q_out.args[2])
    dqs = list(q_out.users)
    if so is None or zo is None or so.numel() != 1 or not all(d.target is _DQ for d in dqs):
        return None
    return out, relu, q_out, dqs


def _build_conv2d_int8(m: QuantMatch, rule: LoweringRule) -> str:
    gm, node = m.gm, m.node
    out, relu, q_out, dqs = _conv_output(m)
    so, zo = attr_tensor(gm, q_out.args[1]), attr_tensor(gm, q_out.args[2])
    (s, z, qmax), w_q = m.act[2], attr_tensor(gm, m.w.q)
    stride, padding, dilation, groups = m.conv
    engine = _engine("conv", _bits(qmax, False), cpu_isa.conv_shape(w_q.shape, stride, padding, dilation, groups),
                     w_q)
    with gm.graph.inserting_before(q_out):
        new = gm.graph.call_function(rule.kernel, (
            m.act[1], m.w.q, m.w.scale, m.bias, stride, padding, dilation, groups, s, z, float(so), int(zo), relu,
            qmax, int(q_out.args[4]), engine))
    copy_meta(new, node)
    QuantAnnotation.carry(new, node)
    # the kernel's output already lies on the output grid: q/dq of it is the identity. Quantized
    # consumers keep reading dq(q(new)) (so they match the static pattern); others read new.
    q_out.replace_input_with(out, new)
    for d in dqs:
        for u in list(d.users):
            if not (u.op == "call_function" and u.target in (aten.linear.default, aten.conv2d.default)
                    and u.args[0] is d and QuantAnnotation.of(u) is not None):
                u.replace_input_with(d, new)
    for dead in ([out] if relu else []) + [node]:
        gm.graph.erase_node(dead)
    new._rename(node.name)
    return "conv2d_int8_relu" if relu else "conv2d_int8"


# ---------------------------------------------------------------- sparse
@dataclass
class SparseMatch:
    """A linear with a stored dense fp32 weight (``density``: its fraction of non-zeros)."""

    gm: fx.GraphModule
    node: fx.Node
    weight: torch.Tensor
    density: float
    config: Any = None


def match_sparse(gm: fx.GraphModule, node: fx.Node, config: Any) -> SparseMatch | None:
    w = attr_tensor(gm, node.args[1])
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return None
    return SparseMatch(gm, node, w, float((w != 0).float().mean()), config)


def _build_linear_csr(m: SparseMatch, rule: LoweringRule) -> str:
    gm, node = m.gm, m.node
    crow, col, values = to_csr(m.weight)
    owner = str(node.args[1].target).rpartition(".")[0]
    mod = gm.get_submodule(owner) if owner else gm
    nodes = []
    for suffix, t in (("crow", crow), ("col", col), ("values", values)):
        attr = f"weight_csr_{suffix}"
        mod.register_buffer(attr, t)
        with gm.graph.inserting_before(node):
            nodes.append(gm.graph.get_attr(f"{owner}.{attr}" if owner else attr))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(rule.kernel, (node.args[0], *nodes, int(m.weight.shape[1]), arg(node, 2, "bias")))
    copy_meta(new, node)
    new.meta["fxopt_sparsity"] = {"pattern": "csr", "density": m.density}
    node.replace_all_uses_with(new)
    old_name = node.name
    gm.graph.erase_node(node)
    new._rename(old_name)
    return rule.name


# ---------------------------------------------------------------- quant: a lone dq(q(x))
@dataclass
class QDQMatch:
    """A static ``dq(q(x, s, z, 0, qmax))`` (per tensor, unsigned codes) no quantized layer reads."""

    gm: fx.GraphModule
    node: fx.Node
    x: fx.Node
    scale: float
    zp: int
    qmax: int


def _layer_input(user: fx.Node, dq: fx.Node) -> bool:
    """Does ``user`` read ``dq`` as the input of a quantized linear or conv (a layer pattern's own)?"""
    return (user.op == "call_function" and user.target in (aten.linear.default, aten.conv2d.default)
            and user.args[0] is dq and QuantAnnotation.of(user) is not None)


def match_qdq(gm: fx.GraphModule, node: fx.Node, config: Any) -> QDQMatch | None:
    act = _activation(gm, node)
    if act is None or act[0] != "static" or not isinstance(act[1], fx.Node):
        return None
    q = node.args[0]
    if node.args[1] is not q.args[1] or node.args[2] is not q.args[2] or node.args[3] != 0:
        return None  # dequantized on another grid than it was quantized on: not a plain round trip
    v = act[1].meta.get("val")
    if not (isinstance(v, torch.Tensor) and v.dtype == torch.float32):
        return None
    if any(_layer_input(u, node) for u in node.users):
        return None
    scale, zp, qmax = act[2]
    return QDQMatch(gm, node, act[1], scale, zp, qmax)


def _build_qdq(m: QDQMatch, rule: LoweringRule) -> str:
    _replace(m.gm, m.node, rule.kernel, (m.x, m.scale, m.zp, m.qmax))
    return rule.name


# ---------------------------------------------------------------- the table
def _static_int8(m: QuantMatch) -> bool:
    return m.kind("static") and m.int8_channel


def _dynamic_int8(m: QuantMatch) -> bool:
    return m.kind("dynamic") and m.int8_channel


def _static_conv(m: QuantMatch) -> bool:
    return (m.conv is not None and m.kind("static") and m.ann.symmetric and m.ann.group_size == 0
            and _conv_output(m) is not None)


def _weight_only(m: QuantMatch) -> bool:
    return m.act is None and not m.x_is_dq  # (a dequantized input is another layer's int8 pattern)


def _weight_only_conv(m: QuantMatch) -> bool:
    return m.conv is not None and m.ann.group_size == 0 and _weight_only(m)


_linear, _conv2d, _embedding = aten.linear.default, aten.conv2d.default, aten.embedding.default
for _rule in (
    LoweringRule("linear_int8", "quant", _linear, ("cpu",), fxq.linear_int8.default,
                 "linear(dq(q(x, s, z)), dq(W8), b)", match_quant, _build_linear_int8, _static_int8),
    LoweringRule("linear_int8_dynamic", "quant", _linear, ("cpu",), fxq.linear_int8_dynamic.default,
                 "linear(dq(q(x, dynamic_scale(x))), dq(W8), b)", match_quant, _build_linear_int8_dynamic,
                 _dynamic_int8),
    LoweringRule("conv2d_int8", "quant", _conv2d, ("cpu",), fxq.conv2d_int8.default,
                 "q(relu?(conv2d(dq(q(x)), dq(W8), b))) then dq", match_quant, _build_conv2d_int8, _static_conv),
    LoweringRule("linear_wq", "quant", _linear, ("cpu",), fxq.linear_wq.default,
                 "linear(x, dq(Wq), b)", match_quant, _build_linear_wq, _weight_only),
    LoweringRule("conv2d_wq", "quant", _conv2d, ("cpu",), fxq.conv2d_wq.default,
                 "conv2d(x, dq(Wq), b)", match_quant, _build_conv2d_wq, _weight_only_conv),
    LoweringRule("embedding_wq", "quant", _embedding, ("cpu", "cuda"), fxq.embedding_wq.default,
                 "embedding(dq(Wq), ids)", match_quant, _build_embedding_wq),
    LoweringRule("quantize_dequantize", "quant", _DQ, ("cpu",), fxq.quantize_dequantize.default,
                 "dq(q(x, s, z)) read by float ops", match_qdq, _build_qdq),
    LoweringRule("linear_csr", "sparse", _linear, ("cpu",), fxq.linear_csr.default,
                 "linear(x, W, b), W mostly zeros", match_sparse, _build_linear_csr,
                 lambda m: m.weight.dtype == torch.float32 and m.density <= getattr(m.config, "max_density", 0.1)),
):
    register_lowering(_rule)
del _rule

"""The canonical dialect and helpers to match ops in it.

Every pass sees one dialect, whatever captured the model: the functional ATen
graph that ``torch.export`` produces after ``run_decompositions({})``. In it

* parameters and buffers are ``get_attr`` nodes named after their module path
  (``layer1_0_conv1_weight`` reads ``layer1.0.conv1.weight``);
* compute is ``call_function`` on ``torch.ops.aten.*`` overloads; composite ops
  that matter for optimization stay whole (``aten.linear``, ``aten.conv2d``,
  ``aten.scaled_dot_product_attention``, ``aten.layer_norm``), batch norm in
  eval mode is ``aten._native_batch_norm_legit_no_training`` followed by
  ``getitem(.., 0)``;
* there are no in-place ops;
* ``node.meta["val"]`` holds a FakeTensor (shapes may be symbolic),
  ``node.meta["nn_module_stack"]`` the module the op came from.

Custom-pass authors match ops with the helpers here instead of spelling ATen
overloads::

    for node in gm.graph.nodes:
        if is_linear(node):
            x, weight, bias = linear_args(node)
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

__all__ = [
    "aten",
    "op_name",
    "module_path",
    "module_type",
    "is_call",
    "is_linear",
    "is_conv",
    "is_batch_norm",
    "is_layer_norm",
    "is_matmul",
    "is_getitem",
    "is_impure",
    "written_attrs",
    "linear_args",
    "conv_args",
    "tensor_meta",
    "get_attr_tensor", "written_attrs",
    "param_nodes",
    "compute_nodes",
    "GUARD_MODULE",
    "arg",
    "is_view_target",
    "op_family",
    "FAMILIES",
    "QUANT_META",
    "QUANT_ANNOTATION_META",
    "CUSTOM_META",
]

aten = torch.ops.aten

#: name of the shape-guard submodule that ``torch.export`` puts in unlifted graphs
GUARD_MODULE = "_guards_fn"

_LINEAR = {aten.linear.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_BATCH_NORM = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default,
               aten._native_batch_norm_legit.default, aten.native_batch_norm.default}
_LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default}
_MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
           aten.baddbmm.default}


# op sets the passes share (one declaration each; passes import these rather than redeclare them)
CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default})
RELU_OPS = frozenset({aten.relu.default, aten.relu_.default})
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default})


# node meta keys (one declaration each; see fxopt.quant.annotation for the quantization ones)
#: insert-qdq's specs of a layer as text ({"weight": "int8/channel", "activation": "uint8/tensor"}), for display
QUANT_META = "fxopt_quant"
#: the same as a typed ``fxopt.quant.annotation.QuantAnnotation``: what lower-quant reads
QUANT_ANNOTATION_META = "fxopt_quant_annotation"
#: torch's dict of user annotations: the node metadata torch.export keeps (JSON data) through save/load
CUSTOM_META = "custom"


_FRIENDLY = {"_native_batch_norm_legit_no_training": "batch_norm", "_native_batch_norm_legit": "batch_norm",
             "native_batch_norm": "batch_norm", "native_layer_norm": "layer_norm",
             "scaled_dot_product_attention": "sdpa", "_assert_tensor_metadata": "assert_meta"}


def is_view_target(target: Any) -> bool:
    """Whether an op returns a view of its input (``getitem`` included): free at run time."""
    if target is operator.getitem:
        return True
    if isinstance(target, torch._ops.OpOverload):
        rets = target._schema.returns
        return bool(rets) and rets[0].alias_info is not None and not target._schema.is_mutable
    return False


def op_name(node: fx.Node) -> str:
    """Short name of what a node does: ``conv2d``, ``linear``, ``getitem``, the module name."""
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            name = t._schema.name.split("::")[-1]
            return _FRIENDLY.get(name, name)
        return getattr(t, "__name__", str(t))
    if node.op == "call_module":
        return str(node.target)
    return node.op


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module the node came from (``""`` for the root).

    ``get_attr`` nodes take the owner of the attribute (``layer1.0.conv1`` for
    ``layer1.0.conv1.weight``).
    """
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):  # export's placeholder for nodes outside any module
        return ""
    # export writes paths like "L['self'].layer1" in some versions
    return path.replace("L['self'].", "").replace("L['self']", "")


def module_type(node: fx.Node) -> str:
    """Qualified class name of the innermost module the node came from, or ``""``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def is_call(node: fx.Node, targets: Iterable[Any]) -> bool:
    return node.op == "call_function" and node.target in targets


def is_linear(node: fx.Node) -> bool:
    """``aten.linear(x, weight, bias=None)``."""
    return is_call(node, _LINEAR)


def is_conv(node: fx.Node) -> bool:
    """Any convolution (1-3 d, transposed, or the generic ``aten.convolution``)."""
    return is_call(node, _CONV)


def is_batch_norm(node: fx.Node) -> bool:
    """Batch norm in either training or inference form."""
    return is_call(node, _BATCH_NORM)


def is_layer_norm(node: fx.Node) -> bool:
    return is_call(node, _LAYER_NORM)


def is_matmul(node: fx.Node) -> bool:
    return is_call(node, _MATMUL)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_impure(node: fx.Node) -> bool:
    """Whether removing or merging the node could change behaviour.

    Placeholders, outputs, modules (the shape guard), asserts, random ops and
    anything fx itself considers impure.
    """
    if node.op in ("placeholder", "output", "call_module"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in t.tags:
                return True
            if t._schema.is_mutable:
                return True
            name = t._schema.name
            if "assert" in name or name.endswith("print"):
                return True
    try:
        return node.is_impure()
    except Exception:  # is_impure inspects the target; unknown targets are impure
        return True


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, or keyword ``name``, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of a linear node; bias may be ``None``."""
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def conv_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of a convolution node; bias may be ``None``."""
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def tensor_meta(node: Any) -> Any:
    """The FakeTensor (or SymInt, or tuple of them) the node produces, or ``None``."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return None


def get_attr_tensor(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The real tensor a ``get_attr`` node reads."""
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def written_attrs(gm: fx.GraphModule) -> set[str]:
    """Targets of the ``get_attr`` tensors the graph writes in place: the model's own state.

    A model that updates a buffer in ``forward`` (a step counter, running statistics)
    captures as ``copy_(buffer, new_value)``; such a buffer is not a constant, and running
    the model changes it.
    """
    out: set[str] = set()
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
            continue
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            while isinstance(v, fx.Node) and v.op == "call_function" and is_view_target(v.target):
                v = v.args[0]
            if isinstance(v, fx.Node) and v.op == "get_attr":
                out.add(str(v.target))
    return out


def param_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr"]


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """``call_function`` nodes: everything that computes."""
    return [n for n in gm.graph.nodes if n.op == "call_function"]


#: node families used for colouring and grouping, in legend order
FAMILIES = ("input", "output", "param", "compute", "norm", "activation", "elementwise", "reduction",
            "view", "cast", "quant", "sparse", "fused", "other")

_ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu",
                "softmax", "_softmax", "log_softmax", "_log_softmax", "mish", "hardtanh", "relu6", "clamp"}
_CASTS = {"_to_copy", "to", "type_as", "convert_element_type", "_assert_tensor_metadata"}


def op_family(node: fx.Node) -> str:
    """Coarse family of a node, one of :data:`FAMILIES` (for colours and grouping)."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "param"
    if node.op != "call_function":
        return "other"
    t = node.target
    name = op_name(node)
    ns = t.namespace if isinstance(t, torch._ops.OpOverload) else ""
    if "quantize" in name or name == "dynamic_scale" or ns in ("quantized_decomposed", "quantized", "torchao"):
        return "quant"
    if ns == "fxopt":
        return "fused"
    if "sparse" in name or "semi_structured" in name:
        return "sparse"
    if is_linear(node) or is_conv(node) or is_matmul(node) or name in ("sdpa",
                                                                       "embedding", "bmm", "einsum"):
        return "compute"
    if is_batch_norm(node) or is_layer_norm(node) or "norm" in name:
        return "norm"
    if name in _ACTIVATIONS:
        return "activation"
    if name in _CASTS:
        return "cast"
    if is_view_target(t):
        return "view"
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.reduction in t.tags:
            return "reduction"
        if torch.Tag.pointwise in t.tags:
            return "elementwise"
    return "other"

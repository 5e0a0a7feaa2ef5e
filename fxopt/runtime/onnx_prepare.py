"""The graph made ready for ONNX export, and where the exported file's integer arithmetic is exact.

:func:`prepare` copies the graph with int4 codes unpacked, CSR linears dense and, where exactness asks
for it, the weights of layers that multiply 8-bit activation codes by 8-bit weights stored as uint8 on
zero point 128: on x86 CPUs without VNNI, ONNX Runtime's and OpenVINO's u8 x s8 kernels add pairs of such
products into a saturating int16 (measured on an AVX2 EPYC: up to 99 output steps off), their u8 x u8
kernels are exact. :func:`keep_float_layers_float` edits the exported model so that ONNX Runtime cannot
quantize a layer fxopt kept in float. :func:`pool_spatial_means` writes a mean over a fixed-size image
as the average pool it is. :func:`exact_on` reads what a file says of itself.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

__all__ = ["prepare", "eight_bit_products", "keep_float_layers_float", "pool_spatial_means", "exact_on", "exact_here",
           "EXACT_KEY", "U8_WEIGHTS", "small_int8_convs", "float_convs", "SMALL_CONV_REDUCTION"]

#: engine argument the exporter gives an int8 layer whose weights it stores as uint8 on zero point 128
U8_WEIGHTS = "u8-weights"
#: the exported model's metadata key saying where its integer arithmetic is exact: ``any`` CPU, or only
#: where the runtime's int8 kernels accumulate in int32 (``int32-dot-products``: VNNI, AMX, Arm)
EXACT_KEY = "fxopt.int8_exact"
#: the code width of the activation operand, per int8 op: (index of its qmax argument, widest 7-bit qmax)
_INT8_OPS = {"linear_int8": (6, 127), "linear_int8_dynamic": (4, 63), "conv2d_int8": (13, 127)}


def _full_args(n: fx.Node) -> list:
    """``n``'s arguments, positional, its schema's defaults filled in."""
    args = list(n.args)
    for a in n.target._schema.arguments[len(args):]:
        args.append(n.kwargs.get(a.name, a.default_value))
    return args


def eight_bit_products(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """The layers that multiply 8-bit activation codes by 8-bit signed weights: lowered int8 ops, and
    weight ``dequantize`` nodes a static 8-bit activation ``dequantize`` meets (runtimes fuse those
    into their int8 kernels). A u8 x s8 kernel that sums pairs of products into a saturating int16
    (x86 without VNNI) is wrong for them; 7-bit codes or 7-bit weights never overflow."""
    from fxopt.ir.rewrite_utils import attr_tensor
    from fxopt.kernels.cpu_quant import weight_bits
    from fxopt.kernels.cpu_isa import weight_max
    ops = torch.ops.fxopt

    def const(n: Any) -> torch.Tensor | None:
        return attr_tensor(gm, n) if isinstance(n, fx.Node) and n.op == "get_attr" else None

    def wide_static_codes(n: Any) -> bool:
        return (isinstance(n, fx.Node) and n.target is ops.dequantize.default and isinstance(n.args[0], fx.Node)
                and n.args[0].target is ops.quantize.default and const(n.args[0].args[1]) is not None
                and n.args[0].args[4] - n.args[0].args[3] > 127)
    layers, weights = [], []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(getattr(n.target, "_overloadpacket", None), "__name__", "")
        if name in _INT8_OPS and getattr(n.target, "namespace", "") == "fxopt":
            at, narrow = _INT8_OPS[name]
            w = const(n.args[1])
            if w is not None and _full_args(n)[at] > narrow and weight_bits(w) == 8:
                layers.append(n)
        elif n.target is ops.dequantize.default:
            w, zp = const(n.args[0]), const(n.args[2])
            if (w is not None and zp is not None and w.dtype == torch.int8 and w.numel()
                    and int(w.abs().max()) > weight_max(7) and int(zp.min()) >= -128 and int(zp.max()) <= 127
                    and any(wide_static_codes(a) for u in n.users for a in u.args if a is not n)):
                weights.append(n)
    return layers, weights


def prepare(gm: fx.GraphModule, portable: bool = True) -> tuple[fx.GraphModule, str]:
    """A copy whose int4 codes are unpacked (one int8 per code), whose CSR linears are dense and, where
    exactness asks for it, whose 8-bit x 8-bit layers keep their weights as uint8 on zero point 128
    (the same values; every runtime's u8 x u8 kernels are exact). With ``portable`` that is every such
    layer; else only on a CPU whose runtimes' u8 x s8 kernels saturate. Also returns what the file is
    exact on (:data:`EXACT_KEY`)."""
    from fxopt.kernels import cpu_isa
    from fxopt.kernels.cpu_quant import unpack_int4
    from fxopt.ir.rewrite_utils import attr_tensor
    import fxopt.kernels.cpu_sparse  # noqa: F401  (defines fxopt::linear_csr)
    ops = torch.ops.fxopt
    packed = (ops.linear_wq.default, ops.embedding_wq.default)

    def todo(g: fx.Graph) -> list[fx.Node]:
        return [n for n in g.nodes if n.op == "call_function" and (
            (n.target in packed and n.args[-1] == 4) or n.target is ops.linear_csr.default)]
    layers, weights = eight_bit_products(gm)
    widen = portable or not cpu_isa.dot_products_exact()
    exact_on = "any" if widen or not (layers or weights) else "int32-dot-products"
    if not todo(gm.graph) and not (widen and (layers or weights)):
        return gm, exact_on
    gm = copy.deepcopy(gm)
    g = gm.graph
    if widen:
        names = {n.name for n in layers + weights}
        # the graph is only traced from here (fake tensors): fxopt's kernels never see these uint8 codes
        for i, n in enumerate(x for x in list(g.nodes) if x.name in names):
            at = (0, 2) if n.target is ops.dequantize.default else (1,)
            new_args = list(n.args) if n.target is ops.dequantize.default else [*_full_args(n)[:-1], U8_WEIGHTS]
            for j in at:
                name = f"_onnx_unsigned_{i}_{j}"
                gm.register_buffer(name, (attr_tensor(gm, n.args[j]).to(torch.int16) + 128).to(torch.uint8))
                with g.inserting_before(n):
                    new_args[j] = g.get_attr(name)
            n.args, n.kwargs = tuple(new_args), {}
    for i, n in enumerate(todo(g)):
        if n.target in packed:
            at = 1 if n.target is ops.linear_wq.default else 0
            name = f"_onnx_unpacked_{i}"
            gm.register_buffer(name, unpack_int4(attr_tensor(gm, n.args[at])))
            with g.inserting_before(n):
                codes = g.get_attr(name)
            n.args = (*n.args[:at], codes, *n.args[at + 1:-1], 8)
        else:
            x, crow, col, values, in_features, bias = n.args
            crow_t = attr_tensor(gm, crow)
            dense = torch.sparse_csr_tensor(crow_t, attr_tensor(gm, col), attr_tensor(gm, values),
                                            (crow_t.numel() - 1, in_features)).to_dense()
            name = f"_onnx_dense_{i}"
            gm.register_buffer(name, dense)
            with g.inserting_before(n):
                w = g.get_attr(name)
                new = g.call_function(torch.ops.aten.linear.default, (x, w, bias))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
    g.eliminate_dead_code()
    gm.recompile()
    return gm, exact_on


def _initializer_dims(g: Any) -> dict[str, list[int]]:
    dims = {t.name: list(t.dims) for t in g.initializer}
    dims.update({n.output[0]: list(a.t.dims) for n in g.node if n.op_type == "Constant" for a in n.attribute
                 if a.name == "value"})
    return dims


def _read_through_float(g: Any, node: Any, dq: Any, done: dict) -> None:
    """Let ``node`` read the output of ``dq`` (a ``DequantizeLinear``) through the same dequantization
    written as float ops, ``(float(q) - zero_point) * scale``: the same values, and no
    ``DequantizeLinear`` for a runtime's QDQ fusion to match."""
    from onnx import TensorProto, helper
    if dq.output[0] not in done:
        base = f"{dq.output[0]}_float_dq"
        q, scale = dq.input[0], dq.input[1]
        nodes = [helper.make_node("Cast", [q], [f"{base}_q"], to=TensorProto.FLOAT, name=f"{base}_cast")]
        codes = f"{base}_q"
        if len(dq.input) > 2 and dq.input[2]:
            nodes.append(helper.make_node("Cast", [dq.input[2]], [f"{base}_zp"], to=TensorProto.FLOAT,
                                          name=f"{base}_cast_zp"))
            nodes.append(helper.make_node("Sub", [codes, f"{base}_zp"], [f"{base}_c"], name=f"{base}_sub"))
            codes = f"{base}_c"
        nodes.append(helper.make_node("Mul", [codes, scale], [base], name=f"{base}_mul"))
        at = list(g.node).index(node)
        for i, n in enumerate(nodes):
            g.node.insert(at + i, n)
        done[dq.output[0]] = base
    node.input[0] = done[dq.output[0]]


def keep_float_layers_float(proto: Any) -> int:
    """Keep ONNX Runtime from quantizing the float layers of a quantized graph on its own.

    ONNX Runtime's ``WeightBiasQuantization`` (on by default) gives any ``Conv``/``ConvTranspose``/``Gemm``
    whose input comes from a per-tensor ``DequantizeLinear`` and whose weight is a float initializer a
    symmetric per-tensor int8 weight, then runs it as an int8 kernel: a layer fxopt kept in float
    (skipped, or too sensitive) would silently compute something else (measured: 1% of the output on a
    conv reading a quantized activation, 17% where the weight had been folded). Such a layer reads its
    input through the same dequantization written as float ops, ``(float(q) - zero_point) * scale``:
    the same values (``DequantizeLinear``'s own arithmetic), with no ``DequantizeLinear`` to match.
    Returns how many inputs it rewrote."""
    from onnx import TensorProto
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    floats = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    dims = _initializer_dims(g)
    rewired, done = 0, {}
    for node in list(g.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or node.input[1] not in floats:
            continue
        if any(d != 1 for d in dims.get(dq.input[1], [0])):  # per-tensor scales only: a per-axis one ORT leaves
            continue
        _read_through_float(g, node, dq, done)
        rewired += 1
    return rewired


def _constant_ints(g: Any, name: str) -> list[int] | None:
    """The values of an int64 initializer or ``Constant`` named ``name`` (None if it is neither)."""
    from onnx import numpy_helper
    for t in g.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for n in g.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
    return None


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, with underscores added until no value in ``taken`` has it; then taken."""
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def pool_spatial_means(proto: Any) -> int:
    """Write each ``ReduceMean`` over both spatial axes of a float ``[N, C, H, W]`` value whose ``H`` and ``W``
    are fixed (a global average pool: ``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3))``) as the ``AveragePool``
    with an ``H x W`` kernel it is, followed by a ``Squeeze`` where the mean dropped those axes.

    The same mean of the same values (no padding; float summation order aside). OpenVINO runs a
    ``ReduceMean`` over the spatial axes of a channels-last int8 tensor with a generic reduction kernel
    and the pool with its pooling kernel: on the digits CNN's 397 x 32 x 8 x 8 codes 0.38 ms against 0.02,
    a sixth of the whole int8 model (``python bench/openvino_int8.py --model digits --profile``). Dims
    that vary (a symbolic image size), other axes or non-float inputs are left as they are. Returns how many
    means it rewrote."""
    from onnx import TensorProto, helper, shape_inference
    g = proto.graph
    means = [(at, n) for at, n in enumerate(g.node) if n.op_type == "ReduceMean" and n.input]
    if not means:
        return 0
    # the exporter writes each value's type and shape; ONNX's shape inference fills in what it left out
    info = {v.name: v.type.tensor_type for v in [*g.value_info, *g.input, *g.output]}
    if any(n.input[0] not in info for _, n in means):
        try:
            typed = shape_inference.infer_shapes(proto).graph
            info.update({v.name: v.type.tensor_type for v in typed.value_info if v.name not in info})
        except Exception:   # shapes unknown: the means without them stay means
            pass
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    done = 0
    for at, node in reversed(means):   # from the last: each rewrite leaves the earlier indices in place
        t = info.get(node.input[0])
        if t is None or t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(t.shape.dim) != 4:
            continue
        h, w = (t.shape.dim[2], t.shape.dim[3])
        if not (h.HasField("dim_value") and w.HasField("dim_value")) or h.dim_value < 1 or w.dim_value < 1:
            continue
        attrs = {a.name: a for a in node.attribute}
        axes = _constant_ints(g, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if axes is None and "axes" in attrs:
            axes = list(attrs["axes"].ints)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = dict(name=f"{node.name or 'mean'}__pool", kernel_shape=[h.dim_value, w.dim_value])
        if attrs["keepdims"].i if "keepdims" in attrs else 1:
            new = [helper.make_node("AveragePool", [node.input[0]], [node.output[0]], **pool)]
        else:   # the pool keeps the axes; a Squeeze drops them into the mean's own output
            pooled = _fresh(f"{node.output[0]}__pooled", taken)
            axes_name = _fresh(f"{pooled}__axes", taken)
            g.initializer.append(helper.make_tensor(axes_name, TensorProto.INT64, [2], [2, 3]))
            new = [helper.make_node("AveragePool", [node.input[0]], [pooled], **pool),
                   helper.make_node("Squeeze", [pooled, axes_name], [node.output[0]],
                                    name=f"{node.name or 'mean'}__squeeze")]
        g.node.remove(node)
        for i, n in enumerate(new):
            g.node.insert(at + i, n)
        done += 1
    return done


#: the widest reduction (input channels x kernel area) of an int8 conv whose float form is timed against
#: it for ONNX Runtime (:func:`fxopt.runtime.engines.tune_onnxruntime`): ORT's int8 conv can be slower than its
#: float conv over a few input channels, not monotonically in the channel count, so each conv up to this
#: bound is measured in its model rather than decided by a rule; wider ones are left int8 untried
SMALL_CONV_REDUCTION = 64


def small_int8_convs(proto: Any) -> list[str]:
    """Names of the ``Conv`` nodes of a QDQ model that ONNX Runtime would fuse into an int8 conv (input from a
    per-tensor ``DequantizeLinear``, weight from a ``DequantizeLinear`` of constant codes) whose reduction
    per output is at most :data:`SMALL_CONV_REDUCTION`: where its int8 conv can be slower than float."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    dims = _initializer_dims(g)
    out = []
    for node in g.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        dq, wdq = producer.get(node.input[0]), producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or wdq is None or wdq.op_type != "DequantizeLinear":
            continue
        if any(d != 1 for d in dims.get(dq.input[1], [0])):
            continue
        w = dims.get(wdq.input[0])
        if w is None or len(w) < 3:
            continue
        reduction = 1
        for d in w[1:]:
            reduction *= d
        if reduction <= SMALL_CONV_REDUCTION:
            out.append(node.name)
    return out


def float_convs(proto: Any, names: list[str]) -> Any:
    """A copy of ``proto`` whose convs ``names`` read their quantized input through float arithmetic
    (:func:`_read_through_float`): ONNX Runtime then runs them as float convs on the same dequantized
    codes and weights. The same values in, the same sum up to float32 rounding (a relative 1e-6 or so
    over at most :data:`SMALL_CONV_REDUCTION` products, against the int8 kernel's exact integer sum), the
    output quantized as before: a code can move by one where the sum lies at a rounding tie."""
    import copy as _copy
    p = _copy.deepcopy(proto)
    g = p.graph
    producer = {o: n for n in g.node for o in n.output}
    done: dict = {}
    for node in [n for n in g.node if n.name in set(names)]:
        _read_through_float(g, node, producer[node.input[0]], done)
    return p


def exact_on(data: bytes) -> str:
    """Where an ONNX model fxopt exported computes its integer arithmetic exactly (:data:`EXACT_KEY`):
    ``any``, or ``int32-dot-products`` (CPUs whose runtimes' int8 kernels accumulate in int32)."""
    import onnx
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return props.get(EXACT_KEY, "int32-dot-products")


def exact_here(data: bytes) -> bool:
    """Does this CPU's runtimes compute ONNX model ``data``'s integer arithmetic exactly (see :func:`exact_on`)?"""
    from fxopt.kernels import cpu_isa
    return exact_on(data) == "any" or cpu_isa.dot_products_exact()

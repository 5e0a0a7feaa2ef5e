"""fxopt.export_onnx: every recipe exports, every fxopt op translates to standard ONNX that ONNX Runtime runs
with fxopt's arithmetic (single layers: to float rounding; whole quantized models: see test_runtimes)."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import DemoNet, demo_inputs
from models import DictOut, TwoBlocks

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from fxopt.runtime.engines import _ort_session  # noqa: E402
from fxopt.runtime.onnx_export import onnx_bytes  # noqa: E402
from fxopt.runtime.onnx_prepare import eight_bit_products  # noqa: E402
from fxopt.kernels import cpu_isa  # noqa: E402


def _run(data: bytes, **feeds: torch.Tensor) -> list[np.ndarray]:
    s = _ort_session(data, 2)
    return s.run(None, {k: v.numpy() for k, v in feeds.items()})


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.detach().float().numpy()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _ops(data: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(data).graph.node}


def _compile(model, args, recipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.compile(model, args, recipe=recipe, **kw)


CALIB = [demo_inputs(8, seed=s) for s in range(4)]


@pytest.mark.parametrize("recipe", ["default", "prune-50", "int8-dynamic", "int8", "int8-weight", "int4-weight",
                                    "sparse-2:4", "canonicalize,fold-bn,insert-qdq", "fp16"])
def test_every_recipe_exports_and_onnx_runtime_agrees_at_other_batch_sizes(recipe):
    torch.manual_seed(0)
    m = DemoNet().eval()
    c = _compile(m, (demo_inputs(4),), recipe, calibration=CALIB if "int8" == recipe or "qdq" in recipe else None)
    data = onnx_bytes(c)
    model = onnx.load_from_string(data)
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["output"]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard ONNX only: no custom op library
    for b in (1, 4, 7):  # the batch stays dynamic
        x = demo_inputs(b, seed=b)
        (out,) = _run(data, x=x)
        # fp16: float16 rounding; static int8: its convs requantize their outputs in ONNX's QDQ form (int32
        # bias, QuantizeLinear's division), so a code may move one output step
        tol = {"fp16": 2e-3, "int8": 1e-2, "canonicalize,fold-bn,insert-qdq": 1e-2}.get(recipe, 1e-5)
        assert _rel(out, c(x)) <= tol, (recipe, b)


def test_quantized_graphs_export_as_quantize_dequantize_and_integer_matmuls():
    torch.manual_seed(0)
    m = DemoNet().eval()
    static = onnx_bytes(_compile(m, (demo_inputs(4),), "int8", calibration=CALIB))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMulInteger"} <= _ops(static)
    for plan in ("avx2", "vnni"):  # both plans on any machine (this test once assumed the machine's own)
        with cpu_isa.forced(plan):
            compiled = _compile(m, (demo_inputs(4),), "int8-dynamic")
        dynamic = onnx_bytes(compiled)
        assert "MatMulInteger" in _ops(dynamic)
        widths = {t.data_type for t in onnx.load_from_string(dynamic).graph.initializer if len(t.dims) == 2}
        if plan == "avx2":  # 7-bit activation codes: int8 weights are exact in every runtime, codes stay int8
            assert not eight_bit_products(compiled)[0]
            assert onnx.TensorProto.INT8 in widths and onnx.TensorProto.UINT8 not in widths, (plan, widths)
        else:  # 8-bit x 8-bit: the portable file carries the weights as uint8 on zero point 128
            assert eight_bit_products(compiled)[0]
            assert onnx.TensorProto.UINT8 in widths and onnx.TensorProto.INT8 not in widths, (plan, widths)
            # portable=False keeps int8 weights only where this CPU's runtimes sum u8 x s8 exactly (VNNI)
            for cpu in ("avx2", None):
                with cpu_isa.forced(cpu) if cpu else contextlib.nullcontext():
                    kept = onnx_bytes(compiled, portable=False)
                    exact = cpu_isa.dot_products_exact()
                kept_widths = {t.data_type for t in onnx.load_from_string(kept).graph.initializer
                               if len(t.dims) == 2}
                want = onnx.TensorProto.INT8 if exact else onnx.TensorProto.UINT8
                assert want in kept_widths, (cpu, exact, kept_widths)
    sim = onnx_bytes(_compile(m, (demo_inputs(4),), "canonicalize,fold-bn,insert-qdq", calibration=CALIB))
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(sim)


class _Layers(nn.Module):
    def __init__(self, k: int = 64):
        super().__init__()
        self.emb = nn.Embedding(97, k)
        self.fc1, self.fc2 = nn.Linear(k, 96), nn.Linear(96, 8, bias=False)

    def forward(self, ids):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.emb(ids))))


@pytest.mark.parametrize("recipe,kernels", [
    ("int8-dynamic", {"linear_int8_dynamic", "embedding_wq"}),
    ("int8-weight", {"linear_wq", "embedding_wq"}),
    ("int4-weight", {"linear_wq", "embedding_wq"}),
    ("canonicalize,insert-qdq(activation=int8/token,embedding=int8/channel)", {"quantize", "dynamic_scale"}),
    ("canonicalize,insert-qdq(weight=int4/group32/asym,activation=none,embedding=int4/group32/asym)", {"dequantize"}),
])
def test_each_translated_op_computes_fxopt_arithmetic(recipe, kernels, cpu_kind):
    """Single layers, 3-D activations, odd sizes, group-wise int4 (packed two per byte): to float rounding,
    on every CPU path (the 7-bit codes of a CPU without VNNI included)."""
    torch.manual_seed(1)
    m = _Layers().eval()
    ids = torch.randint(0, 97, (3, 11))
    c = _compile(m, (ids,), recipe, group_size=32) if "int4-weight" == recipe else _compile(m, (ids,), recipe)
    present = {str(n.target).split(".")[1] for n in c.graph.nodes if str(n.target).startswith("fxopt.")}
    assert kernels <= present, present
    data = onnx_bytes(c)
    for shape in ((3, 11), (1, 11), (5, 11)):  # the batch is dynamic ("ids" is not a token input name)
        ids2 = torch.randint(0, 97, shape)
        (out,) = _run(data, ids=ids2)
        assert _rel(out, c(ids2)) <= 1e-5, (recipe, shape, cpu_kind)


def test_int8_codes_at_the_edges_of_their_range_agree():
    """Activations far outside the calibrated range saturate the codes; huge and tiny rows per token."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    calib = [torch.randn(16, 32) for _ in range(4)]
    for recipe in ("int8", "int8-dynamic"):
        c = _compile(m, (calib[0],), recipe, calibration=calib if recipe == "int8" else None)
        data = onnx_bytes(c)
        x = torch.randn(6, 32) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 0.0, 3.0]).unsqueeze(1)
        (out,) = _run(data, input=x)
        ref = c(x)
        # one code may round the other way at an exact tie (QuantizeLinear divides, fbgemm multiplies
        # by the reciprocal): allow one activation step through the layer, nothing more
        assert _rel(out, ref) <= 1e-4, recipe


def test_static_int8_convs_export_in_the_qdq_form_and_agree_to_one_output_step():
    torch.manual_seed(3)
    m = DemoNet().eval()
    c = _compile(m, (demo_inputs(4),), "int8", calibration=CALIB)
    convs = [n for n in c.graph.nodes if n.target is torch.ops.fxopt.conv2d_int8.default]
    assert convs
    data = onnx_bytes(c)
    x = demo_inputs(9, seed=11)
    (out,) = _run(data, x=x)
    assert _rel(out, c(x)) <= 2e-2


def test_csr_linears_export_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.95] = 0
    c = _compile(model, (torch.randn(4, 64),), "lower-sparse")
    assert any(n.target is torch.ops.fxopt.linear_csr.default for n in c.graph.nodes)
    data = onnx_bytes(c)
    x = torch.randn(5, 64)
    (out,) = _run(data, input=x)
    assert _rel(out, c(x)) <= 1e-5


def test_keyword_inputs_and_structured_outputs_keep_their_names(tmp_path):
    m = DictOut().eval()
    kw = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    c = _compile(m, (), "int8-dynamic", kwargs=kw)
    path = fxopt.export_onnx(c, tmp_path / "d.onnx")
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits", "pooled_0", "pooled_1"]
    kw2 = {"input_ids": torch.randint(0, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    outs = _run(open(path, "rb").read(), **kw2)  # batch and sequence stay dynamic
    ref = c(**kw2)
    for got, want in zip(outs, [ref["logits"], *ref["pooled"]]):
        assert _rel(got, want) <= 1e-5


def test_a_loaded_model_exports_too(tmp_path):
    m = DemoNet().eval()
    c = _compile(m, (demo_inputs(4),), "int8-dynamic")
    fxopt.save(c, tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    (out,) = _run(onnx_bytes(loaded), x=demo_inputs(3))
    assert _rel(out, c(demo_inputs(3))) <= 1e-5


@torch.library.custom_op("fxopt_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_onnx_cannot_express_is_a_clear_export_error():
    class M(nn.Module):
        def forward(self, x):
            return torch.ops.fxopt_test.opaque(x) + 1
    c = _compile(M(), (torch.randn(2, 3),), "default")
    with pytest.raises(fxopt.ExportError, match="no ONNX translation for fxopt_test.opaque.default"):
        onnx_bytes(c)
    from onnxscript import opset21 as op
    from fxopt.runtime import onnx_export
    onnx_export.register_translation(torch.ops.fxopt_test.opaque.default,
                                     lambda x: op.Mul(x, op.Constant(value_float=2.0)))
    try:
        x = torch.randn(3, 3)
        (out,) = _run(onnx_bytes(c), x=x)
        assert _rel(out, c(x)) <= 1e-6
    finally:
        onnx_export._USER.clear()


def test_bad_arguments_are_typed_errors(tmp_path):
    with pytest.raises(fxopt.InputError, match="expects a module returned by fxopt.compile"):
        fxopt.export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx")


@pytest.mark.parametrize("qmax", [255, 127])
def test_a_fused_quantize_dequantize_exports_and_agrees(qmax):
    """fxopt::quantize_dequantize (a residual add's quantized identity) -> QuantizeLinear [Clip] DequantizeLinear."""
    class Q(nn.Module):
        def forward(self, x):
            return torch.ops.fxopt.quantize_dequantize(x, 0.05, 9, qmax) * 2.0
    gm = torch.fx.symbolic_trace(Q())
    x = torch.randn(5, 40) * 4
    x[0, :3] = torch.tensor([1e6, -1e6, 0.0])
    data = onnx_bytes(gm, (x,))
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(data) and ("Clip" in _ops(data)) == (qmax < 255)
    (out,) = _run(data, **{onnx.load_from_string(data).graph.input[0].name: x})
    # ONNX divides by the scale where fxopt multiplies by its float32 reciprocal: one code at an exact tie
    assert np.abs(out - gm(x).numpy()).max() <= 2 * 0.05 + 1e-6
    assert _rel(out, gm(x)) <= 1e-2


def test_a_resnet_block_graph_for_an_onnx_runtime_quantizes_its_identity_and_agrees():
    torch.manual_seed(0)
    m, x = TwoBlocks().eval(), torch.rand(2, 3, 10, 10)
    c = _compile(m, (x,), "insert-qdq(residuals=true),lower-quant", calibration=[torch.rand(2, 3, 10, 10) for _ in range(3)])
    assert torch.ops.fxopt.quantize_dequantize.default in [n.target for n in c.graph.nodes]
    data = onnx_bytes(c)
    (out,) = _run(data, x=x)
    assert _rel(out, c(x)) <= 2e-2


class _WideLayers(nn.Module):
    """A stem conv on one channel, a 16-channel conv and a linear: every kind of int8 layer the exporter
    writes, with weights that use all 8 bits."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).flatten(1))


def _saturating_weights(m: nn.Module) -> nn.Module:
    """Weights of +-max in alternating pairs along the reduction: the sums a saturating int16 gets wrong."""
    with torch.no_grad():
        for p in (m.stem.weight, m.conv.weight, m.fc.weight):
            flat = p.view(p.shape[0], -1)
            flat.copy_(torch.where(torch.arange(flat.shape[1]) % 4 < 2, 1.0, 0.9).expand_as(flat))
            flat[1::2] *= -1
    return m


@pytest.mark.parametrize("recipe", ["int8", "int8-dynamic", "canonicalize,insert-qdq"])
def test_a_model_planned_for_vnni_exports_exact_on_every_cpu(recipe):
    """8-bit codes times 8-bit weights (a VNNI plan): the portable file keeps no signed 8-bit weight an
    integer kernel could pair into a saturating int16, and computes fxopt's arithmetic on this CPU even at
    the inputs that drive every code to its extreme (on a CPU without VNNI the int8 weights were up to
    99 output steps off in ONNX Runtime and OpenVINO)."""
    from fxopt.kernels import cpu_isa
    from fxopt.runtime.onnx_export import exact_on
    torch.manual_seed(0)
    m = _saturating_weights(_WideLayers().eval())
    calib = [torch.rand(4, 1, 8, 8) for _ in range(3)]
    with cpu_isa.forced("vnni"):
        c = _compile(m, (calib[0],), recipe, calibration=calib if recipe != "int8-dynamic" else None)
    layers, weights = eight_bit_products(c)
    assert layers or weights  # the VNNI plan put 8-bit codes on 8-bit weights somewhere
    names = {str(n.args[1].target) for n in layers} | {str(n.args[0].target) for n in weights}
    data = onnx_bytes(c)
    assert exact_on(data) == "any"
    model = onnx.load_from_string(data)
    signed = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert not names & signed, names & signed  # those weights went out as uint8
    for x in (torch.full((2, 1, 8, 8), 1e3), torch.rand(3, 1, 8, 8)):  # every code at its top, then typical
        (out,) = _run(data, x=x)
        tol = 1e-5 if recipe == "int8-dynamic" else 2e-2  # static: a requantized code may move one step
        assert _rel(out, c(x)) <= tol, (recipe, x.shape)


def test_this_cpu_form_keeps_int8_weights_only_where_runtimes_sum_them_exactly(monkeypatch):
    from fxopt.kernels import cpu_isa
    from fxopt.runtime.onnx_export import exact_here, exact_on
    m = _saturating_weights(_WideLayers().eval())
    with cpu_isa.forced("vnni"):
        c = _compile(m, (torch.rand(2, 1, 8, 8),), "int8-dynamic")
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: True)  # a CPU with VNNI
    fast = onnx_bytes(c, portable=False)
    assert exact_on(fast) == "int32-dot-products" and exact_here(fast)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load_from_string(fast).graph.initializer)
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: False)  # the same file on a CPU without it
    assert not exact_here(fast)
    assert exact_on(onnx_bytes(c, portable=False)) == "any"
    # a layer with 7-bit weights (fxopt's plan without VNNI) is exact anywhere as it is: nothing to change
    with cpu_isa.forced("avx2"):
        narrow = _compile(m, (torch.rand(2, 1, 8, 8),), "int8-dynamic")
    assert exact_on(onnx_bytes(narrow, portable=True)) == "any"


def test_dot_products_exact_follows_the_cpu_flags(monkeypatch):
    from fxopt.kernels import cpu_isa
    info = lambda flags, arch="x86_64": (arch, "x", tuple(flags), "", ())  # noqa: E731
    for flags, want in ((("avx2",), False), (("avx2", "avx512_vnni"), True), (("avx_vnni",), True),
                        (("amx_int8",), True)):
        monkeypatch.setattr(cpu_isa, "_static_info", lambda f=flags: info(f))
        assert cpu_isa.dot_products_exact() is want, flags
        with cpu_isa.forced("avx2"):
            assert cpu_isa.dot_products_exact() is False
    monkeypatch.setattr(cpu_isa, "_static_info", lambda: info(("asimd",), "aarch64"))
    assert cpu_isa.dot_products_exact() is True


@pytest.mark.parametrize("recipe", ["canonicalize,insert-qdq(skip=[conv])", "int8"])
def test_a_layer_kept_in_float_stays_float_in_onnx_runtime(recipe):
    """ONNX Runtime quantizes on its own the float weight of a conv that reads a per-tensor
    DequantizeLinear (WeightBiasQuantization): the file must keep the layer fxopt left in float (a skipped
    one; a small stem weight) computing in float."""
    torch.manual_seed(0)
    m = _WideLayers().eval()
    calib = [torch.rand(4, 1, 8, 8) for _ in range(3)]
    c = _compile(m, (calib[0],), recipe, calibration=calib)
    data = onnx_bytes(c)
    x = torch.rand(3, 1, 8, 8)
    (out,) = _run(data, x=x)
    tol = 1e-5 if "skip" in recipe else 2e-2  # int8: its requantized convs may move a code one step
    assert _rel(out, c(x)) <= tol


class _Means(nn.Module):
    """Three means of one conv output: a global average pool, the same as x.mean((2, 3)) (axes dropped),
    and a mean over channels, which is no pool."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(self.pool(h).flatten(1)) + self.head(h.mean((2, 3))) + h.mean(1).sum((1, 2))[:, None]


@pytest.mark.parametrize("recipe", ["default", "int8"])
def test_a_global_mean_over_a_fixed_image_exports_as_an_average_pool(recipe, monkeypatch):
    from fxopt.runtime import onnx_export
    torch.manual_seed(0)
    m = _Means().eval()
    calib = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    c = _compile(m, (calib[0],), recipe, calibration=calib if recipe == "int8" else None)
    data = onnx_bytes(c)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    # both spatial means are pools (the one that dropped its axes squeezes them); the channel mean is not
    assert ops.count("AveragePool") == 2 and ops.count("Squeeze") >= 1 and ops.count("ReduceMean") == 1, ops
    monkeypatch.setattr(onnx_export, "pool_spatial_means", lambda proto: 0)
    before = onnx_bytes(c)
    assert _ops(before) >= {"ReduceMean"} and "AveragePool" not in _ops(before)
    for b in (1, 4, 5):   # the batch stays dynamic; extreme inputs too
        for x in (torch.randn(b, 3, 10, 10), torch.randn(b, 3, 10, 10) * 1e3, torch.zeros(b, 3, 10, 10)):
            (new,), (old,) = _run(data, x=x), _run(before, x=x)
            # the same mean: float summation order aside (a requantized code of the int8 head's input
            # could move one step at a rounding tie)
            assert _rel(new, torch.as_tensor(old)) <= (1e-5 if recipe == "default" else 1e-2), (b, recipe)
            assert _rel(new, c(x)) <= (1e-5 if recipe == "default" else 1e-2), (b, recipe)


def test_a_mean_over_an_image_of_varying_size_stays_a_mean():
    from fxopt.runtime.onnx_prepare import pool_spatial_means
    m = _Means().eval()
    c = _compile(m, (torch.randn(2, 3, 10, 10),), "default", dynamic=True)
    data = onnx_bytes(c)
    assert "AveragePool" not in _ops(data) and "ReduceMean" in _ops(data)   # H, W unknown: no kernel size
    for size in (7, 12):
        x = torch.randn(3, 3, size, size)
        assert _rel(_run(data, x=x)[0], c(x)) <= 1e-5
    assert pool_spatial_means(onnx.load_from_string(data)) == 0


def test_pool_rewrite_on_hand_written_models():
    from onnx import TensorProto, helper
    from fxopt.runtime.onnx_prepare import pool_spatial_means

    def model(keepdims, axes_from_input=False, dims=(2, 3, 5, 7)):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *dims[1:]])
        inputs = [x]
        if axes_from_input:   # axes computed at run time: not known to be the spatial ones
            inputs.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [2]))
            inits = []
        else:
            inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [-2, -1])]
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        g = helper.make_graph([node], "g", inputs, [y], initializer=inits)   # no value_info at all
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    x = np.random.default_rng(0).standard_normal((3, 3, 5, 7)).astype(np.float32) * 1e4
    for keep in (0, 1):
        m = model(keep)
        assert pool_spatial_means(m) == 1
        assert {n.op_type for n in m.graph.node} == ({"AveragePool"} if keep else {"AveragePool", "Squeeze"})
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = s.run(None, {"x": x})
        want = x.mean((2, 3), keepdims=bool(keep))
        assert y.shape == want.shape and np.allclose(y, want, rtol=1e-5, atol=1e-2)
    m = model(1, axes_from_input=True)
    assert pool_spatial_means(m) == 0 and m.graph.node[0].op_type == "ReduceMean"

"""compile(runtime=...): the graph handed to ONNX Runtime / OpenVINO / Inductor, checked against fxopt's graph,
the fastest that agrees kept; RuntimeModule called like the model; save/load keeps the runtime and re-checks it."""
from __future__ import annotations

import hashlib
import json
import warnings
import zipfile

import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import DemoNet, demo_inputs
from models import DictOut, state_hash

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fxopt.runtime import onnx_export, select  # noqa: E402
from fxopt.runtime.onnx_prepare import eight_bit_products  # noqa: E402
from fxopt.runtime.engines import RUNTIMES, RuntimeModule, list_runtimes  # noqa: E402


def _compile(model, args=(), recipe="default", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.compile(model, args, recipe=recipe, **kw)


def test_a_named_runtime_is_called_exactly_like_the_model():
    m = DictOut().eval()
    kw = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    before = state_hash(m)
    r = _compile(m, kwargs=kw, recipe="int8-dynamic", runtime="onnxruntime")
    assert isinstance(r, RuntimeModule) and r.runtime == "onnxruntime" and state_hash(m) == before
    plain = r.graph_module
    kw2 = {"input_ids": torch.randint(0, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    got, want = r(**kw2), plain(**kw2)
    assert set(got) == {"logits", "pooled"} and isinstance(got["pooled"], tuple)
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r(kw2["input_ids"], kw2["attention_mask"])["pooled"][1], want["pooled"][1],
                               atol=1e-5, rtol=1e-5)  # positionally too
    with pytest.raises(fxopt.InputError, match="missing keyword input"):
        r(input_ids=kw2["input_ids"])
    with pytest.raises(fxopt.InputError):
        r(input_ids=kw2["input_ids"].float(), attention_mask=kw2["attention_mask"])
    rec = r.fxopt_history.runtime
    assert rec["chosen"] == "onnxruntime" and rec["candidates"]["onnxruntime"]["max_rel_err"] <= 1e-4
    assert "runtime: onnxruntime" in str(r.fxopt_history)


def test_auto_times_every_installed_runtime_and_keeps_the_fastest_that_agrees():
    torch.manual_seed(0)
    m = DemoNet().eval()
    r = _compile(m, (demo_inputs(8),), "int8-dynamic", runtime="auto", latency_repeats=5)
    rec = r.fxopt_history.runtime
    timed = {n: e["ms"] for n, e in rec["candidates"].items() if "ms" in e}
    assert "torch" in timed and "onnxruntime" in timed
    assert rec["chosen"] == min(timed, key=timed.get)
    assert rec["original_ms"] > 0 and "fastest of the runtimes" in rec["why"]
    if "openvino" in rec["candidates"] and not RUNTIMES["openvino"].available:
        assert "pip install" in rec["candidates"]["openvino"]["refused"]
    x = demo_inputs(5, seed=3)
    plain = r.graph_module if isinstance(r, RuntimeModule) else r
    torch.testing.assert_close(r(x), plain(x).detach(), atol=1e-5, rtol=1e-5)


def test_a_runtime_that_computes_something_else_is_refused(monkeypatch):
    """A wrong translation (scales off by 5%) must not be handed back: auto skips it, a named runtime raises."""
    real = onnx_export.translation_table

    def broken():
        from onnxscript import opset21 as op
        table = dict(real())
        good = table[torch.ops.fxopt.linear_int8_dynamic.default]

        def bad(x, w_q, w_scale, bias, x_qmax: int = 127, engine: str = ""):
            return op.Mul(good(x, w_q, w_scale, bias, x_qmax, engine), op.Constant(value_float=1.05))
        table[torch.ops.fxopt.linear_int8_dynamic.default] = bad
        return table
    monkeypatch.setattr(onnx_export, "translation_table", broken)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    r = _compile(m, (x,), "int8-dynamic", runtime="auto", runtime_candidates=["onnxruntime"])
    assert not isinstance(r, RuntimeModule)
    refused = r.fxopt_history.runtime["candidates"]["onnxruntime"]["refused"]
    assert "differ" in refused or "accurate" in refused
    with pytest.raises(fxopt.RuntimeUnavailable, match="onnxruntime|differ|accurate"):
        _compile(m, (x,), "int8-dynamic", runtime="onnxruntime")


BF16 = "canonicalize,cast(dtype=bf16,decline=never),cleanup"  # casts on any CPU (bf16 is emulated without it)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64)).eval()


def _fake_runtime(monkeypatch, run):
    """A stand-in runtime (named onnxruntime, needing nothing) whose outputs come from ``run(gm, a, k)``."""
    from fxopt.runtime.engines import Built, Runtime
    monkeypatch.setitem(RUNTIMES, "onnxruntime", Runtime(
        "onnxruntime", (), None, "stand-in", lambda gm, args, kwargs, **_: Built(lambda a, k: run(gm, a, k))))


def test_a_bf16_graph_is_judged_by_its_own_rounding_error(monkeypatch):
    """A bf16 graph on another runtime rounds on its own: it is held to its accuracy against the float model
    and to twice fxopt's bf16 error from fxopt's graph (LOW_PRECISION_RULE), not to the float tolerance
    (which refused OpenVINO's bf16 kernels at 0.018 of the output) nor to the quantized graphs' rule."""
    m, x = _mlp(), torch.randn(16, 64)
    float_model = _mlp()
    # halfway past the float model: more accurate than fxopt's graph, 1.5x its error away from it
    _fake_runtime(monkeypatch, lambda gm, a, k: (lambda g, f: g + 1.5 * (f - g))(gm(*a, **k), float_model(*a, **k)))
    r = _compile(m, (x,), BF16, runtime="onnxruntime")
    rec = r.fxopt_history.runtime
    assert isinstance(r, RuntimeModule) and select._is_low_precision(r.graph_module)
    assert rec["low_precision"] and not rec["quantized"] and rec["quant_err"][0] > 1e-3
    assert "bf16/fp16 rounding error" in select.describe(rec)
    # the quantized graphs' rule (half the error, the median within one) would refuse the same runtime
    monkeypatch.setattr(select, "LOW_PRECISION_RULE", select.QUANT_RULE)
    with pytest.raises(fxopt.RuntimeUnavailable, match="differ|arithmetic"):
        _compile(m, (x,), BF16, runtime="onnxruntime")
    monkeypatch.undo()
    # something else is still refused: outputs 5% off
    _fake_runtime(monkeypatch, lambda gm, a, k: gm(*a, **k) * 1.05)
    r = _compile(m, (x,), BF16, runtime="auto", runtime_candidates=["onnxruntime"], latency_repeats=3)
    refused = r.fxopt_history.runtime["candidates"]["onnxruntime"]["refused"]
    assert "differ" in refused or "accurate" in refused
    with pytest.raises(fxopt.RuntimeUnavailable):
        _compile(m, (x,), BF16, runtime="onnxruntime")


def test_low_precision_is_read_from_values_weights_and_casts():
    m = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)).eval()
    ids = torch.randint(0, 50, (2, 5))
    c = _compile(m, (ids,), BF16)
    assert select._is_low_precision(c)  # integer inputs: its casts go back to float32 only
    assert not select._is_low_precision(_compile(m, (ids,), "default"))


@pytest.mark.skipif(not RUNTIMES["openvino"].available, reason="openvino not installed")
def test_openvino_runs_a_bf16_graph():
    m, x = _mlp(), torch.randn(16, 64)
    r = _compile(m, (x,), BF16, runtime="openvino")
    rec = r.fxopt_history.runtime
    assert rec["low_precision"] and "refused" not in rec["candidates"]["openvino"]
    x2 = torch.randn(5, 64)
    ref = m(x2).detach()
    assert float(torch.nn.functional.cosine_similarity(r(x2), ref).min()) > 0.999


def test_unknown_and_missing_runtimes_say_what_to_do(monkeypatch):
    m = nn.Linear(4, 2).eval()
    with pytest.raises(fxopt.RuntimeUnavailable, match="unknown runtime 'tensorrt'.*auto"):
        _compile(m, (torch.randn(2, 4),), runtime="tensorrt")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(fxopt.RuntimeUnavailable, match=r'pip install "fxopt\[openvino\]"'):
        _compile(m, (torch.randn(2, 4),), runtime="openvino")
    assert "fxopt[openvino]" in list_runtimes()["openvino"]
    r = _compile(m, (torch.randn(2, 4),), runtime="auto", latency_repeats=3)  # auto: uses what is installed
    assert "pip install" in r.fxopt_history.runtime["candidates"]["openvino"]["refused"]


def test_a_graph_that_does_not_export_keeps_fxopt_graph_under_auto():
    @torch.library.custom_op("fxopt_test::noexport", mutates_args=())
    def noexport(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    @noexport.register_fake
    def _(x):
        return torch.empty_like(x)

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.fxopt_test.noexport(x) * 2
    r = _compile(M(), (torch.randn(2, 3),), runtime="auto", latency_repeats=3)
    assert not isinstance(r, RuntimeModule)
    assert "no ONNX translation" in r.fxopt_history.runtime["candidates"]["onnxruntime"]["refused"]


@pytest.mark.skipif(not RUNTIMES["openvino"].available, reason="openvino not installed")
def test_openvino_runs_the_exported_graph_in_fp32():
    torch.manual_seed(0)
    m = DemoNet().eval()
    r = _compile(m, (demo_inputs(4),), "int8-weight", runtime="openvino")
    x = demo_inputs(6, seed=2)
    torch.testing.assert_close(r(x), r.graph_module(x).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not RUNTIMES["openvino"].available, reason="openvino not installed")
def test_openvino_keeps_weight_only_layers_on_float_activations():
    """OpenVINO quantizes the activations of layers with int8 weight constants by itself, even at f32
    (groups of 32 along the input): at these widths that computed 0.01 of the output off fxopt's graph,
    less accurately, and was refused (on a VNNI EPYC). The runtime now computes fxopt's arithmetic. On a CPU
    where OpenVINO does not quantize on its own (no int8 dot products) only the setting is checked."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(384, 512), nn.GELU(), nn.Linear(512, 384)).eval()
    r = _compile(m, (torch.randn(64, 384),), "int8-weight", runtime="openvino")
    assert r.runtime_info["dynamic_quantization"] == 0
    for x in (torch.randn(32, 384) * 3, torch.randn(5, 384) * 1e3):
        ref = r.graph_module(x).detach()
        assert float((r(x) - ref).abs().max() / ref.abs().max()) < 1e-5


def test_save_keeps_the_runtime_and_load_rechecks_it(tmp_path):
    torch.manual_seed(0)
    m = DemoNet().eval()
    r = _compile(m, (demo_inputs(4),), "int8-dynamic", runtime="onnxruntime")
    path = tmp_path / "m.fxopt"
    fxopt.save(r, path)
    loaded = fxopt.load(path)
    assert isinstance(loaded, RuntimeModule) and loaded.runtime == "onnxruntime"
    x = demo_inputs(3, seed=5)
    torch.testing.assert_close(loaded(x), r(x))
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"manifest.json", "model.pt2", "runtime.onnx"}


def _rewrite(src, dst, onnx_bytes=None, manifest_edit=None, fix_sum=True):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members["manifest.json"])
    if onnx_bytes is not None:
        members["runtime.onnx"] = onnx_bytes
        if fix_sum:
            manifest["sha256"]["runtime.onnx"] = hashlib.sha256(onnx_bytes).hexdigest()
    if manifest_edit:
        manifest_edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def test_crafted_runtime_artifacts_are_refused_before_any_runtime_sees_them(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    r = _compile(DemoNet().eval(), (demo_inputs(4),), "int8-dynamic", runtime="onnxruntime")
    good = tmp_path / "good.fxopt"
    fxopt.save(r, good)
    model = onnx.load_from_string(r.artifact)

    ext = onnx.ModelProto()
    ext.CopyFrom(model)
    t = ext.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "/etc/passwd"
    _rewrite(good, tmp_path / "ext.fxopt", ext.SerializeToString())
    with pytest.raises(fxopt.LoadError, match="outside the file"):
        fxopt.load(tmp_path / "ext.fxopt")

    custom = onnx.ModelProto()
    custom.CopyFrom(model)
    custom.graph.node[0].domain = "com.evil"
    _rewrite(good, tmp_path / "custom.fxopt", custom.SerializeToString())
    with pytest.raises(fxopt.LoadError, match="domain 'com.evil'"):
        fxopt.load(tmp_path / "custom.fxopt")

    _rewrite(good, tmp_path / "sum.fxopt", r.artifact[:-10], fix_sum=False)
    with pytest.raises(fxopt.LoadError, match="checksum"):
        fxopt.load(tmp_path / "sum.fxopt")

    _rewrite(good, tmp_path / "junk.fxopt", b"\x00junk" * 50)
    with pytest.raises(fxopt.LoadError, match="does not parse|runtime"):
        fxopt.load(tmp_path / "junk.fxopt")

    _rewrite(good, tmp_path / "name.fxopt", manifest_edit=lambda mf: mf["runtime"].update(name="os.system"))
    with pytest.raises(fxopt.LoadError, match="runtime entry"):
        fxopt.load(tmp_path / "name.fxopt")

    # a valid ONNX model of a different network: it parses and is standard, but it is not this graph
    other = _compile(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), (demo_inputs(4),), "default",
                     runtime="onnxruntime")
    _rewrite(good, tmp_path / "swap.fxopt", other.artifact)
    with pytest.warns(RuntimeWarning, match="cannot run here|differ"):
        loaded = fxopt.load(tmp_path / "swap.fxopt")
    assert not isinstance(loaded, RuntimeModule)


def test_minilm_int8_dynamic_on_every_runtime_is_as_accurate_as_fxopt_graph(minilm):
    model, kw = minilm
    r = _compile(model, kwargs=kw, recipe="int8-dynamic", runtime="auto", latency_repeats=3)
    rec = r.fxopt_history.runtime
    assert rec["quant_err"] is not None
    for name, e in rec["candidates"].items():
        if "refused" not in e:
            assert e["err_vs_float"][0] <= 1.1 * rec["quant_err"][0] + 1e-4
    assert "onnxruntime" in rec["candidates"] and "refused" not in rec["candidates"]["onnxruntime"]
    out = r(**kw)
    assert out.last_hidden_state.shape == model(**kw).last_hidden_state.shape


def test_inductor_is_a_runtime_when_named():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(4, 8)
    r = _compile(m, (x,), runtime="auto", runtime_candidates=["inductor"], latency_repeats=3)
    assert "inductor" in r.fxopt_history.runtime["candidates"]
    e = r.fxopt_history.runtime["candidates"]["inductor"]
    assert "ms" in e or "refused" in e


def test_agreement_measures_structures_and_values():
    a = {"x": torch.ones(3), "y": (torch.zeros(2), torch.tensor([1, 2]))}
    assert select.agreement(a, a) == (0.0, 0.0)
    b = {"x": torch.ones(3) * 1.5, "y": (torch.zeros(2), torch.tensor([1, 2]))}
    assert select.agreement(a, b)[0] == pytest.approx(0.5)
    assert select.agreement(a, {"x": torch.ones(4), "y": a["y"]})[0] == float("inf")
    assert select.agreement(a, {"x": torch.full((3,), float("nan")), "y": a["y"]})[0] == float("inf")


def test_a_runtime_module_copies_with_its_own_session():
    import copy
    torch.manual_seed(0)
    r = _compile(DemoNet().eval(), (demo_inputs(4),), "default", runtime="onnxruntime")
    c = copy.deepcopy(r)
    assert c._built is not r._built and c.graph_module is not r.graph_module
    x = demo_inputs(2, seed=9)
    torch.testing.assert_close(c(x), r(x))


def test_the_report_shows_the_runtime_decision(tmp_path):
    r = _compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(4, 8),), runtime="auto",
                 latency_repeats=3, report=str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert "<h3>Runtime</h3>" in text and "onnxruntime" in text and r.fxopt_history.runtime["chosen"] in text


def test_sessions_share_the_cpu_and_keep_fxopt_arithmetic():
    """Worker threads that sleep after a call (spinning ones slowed PyTorch 4x on 2 cores), torch's thread
    count, fp32 weight-only matmuls in ONNX Runtime, f32 in OpenVINO (its default is bf16 on AMX CPUs)."""
    from fxopt.runtime.engines import _ort_session
    data = onnx_export.onnx_bytes(_compile(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),)))
    opts = _ort_session(data, 3).get_session_options()
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    if RUNTIMES["openvino"].available:
        r = _compile(DemoNet().eval(), (demo_inputs(4),), "int8-weight", runtime="openvino")
        assert "float32" in r.runtime_info["precision"] and r.runtime_info["dynamic_quantization"] == 0


def test_a_result_measured_slower_than_the_original_is_said_loudly(monkeypatch, tmp_path):
    import fxopt.viz.timing as timing
    calls = iter([1.0, 2.0])  # the original 1 ms, the compiled model 2 ms
    monkeypatch.setattr(timing, "median_ms", lambda fn, repeats: next(calls))
    with pytest.warns(RuntimeWarning, match="slower than the original"):
        fxopt.compile(nn.Linear(4, 2).eval(), (torch.randn(2, 4),), report=str(tmp_path / "r.html"),
                      latency_repeats=2)


def test_warn_if_slower_reads_the_runtime_record():
    with pytest.warns(RuntimeWarning, match="slower than the original"):
        select.warn_if_slower({"original_ms": 1.0, "chosen": "torch", "candidates": {"torch": {"ms": 2.0}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select.warn_if_slower({"original_ms": 2.0, "chosen": "torch", "candidates": {"torch": {"ms": 1.0}}})


def test_a_saved_runtime_made_for_vnni_is_exported_again_where_it_would_saturate(tmp_path, monkeypatch):
    """A .fxopt saved on a CPU with VNNI keeps signed 8-bit weights in its runtime's ONNX model; loaded on a
    CPU without VNNI that model would saturate, so the runtime is rebuilt from the graph, in the form that
    is exact here."""
    from fxopt.kernels import cpu_isa
    torch.manual_seed(0)
    m = DemoNet().eval()
    with cpu_isa.forced("vnni"):
        r = _compile(m, (demo_inputs(4),), "int8-dynamic", runtime="onnxruntime")
    fxopt.save(r, tmp_path / "here.fxopt")
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: True)  # what a VNNI machine would have saved
    vnni = onnx_export.onnx_bytes(r.graph_module, portable=False)
    assert onnx_export.exact_on(vnni) == "int32-dot-products"
    _rewrite(tmp_path / "here.fxopt", tmp_path / "vnni.fxopt", onnx_bytes=vnni)
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: False)  # loaded on a CPU without VNNI
    loaded = fxopt.load(tmp_path / "vnni.fxopt")
    assert isinstance(loaded, RuntimeModule) and onnx_export.exact_on(loaded.artifact) == "any"
    x = demo_inputs(3, seed=5)
    torch.testing.assert_close(loaded(x), loaded.graph_module(x).detach(), atol=1e-4, rtol=1e-4)


def test_a_file_claiming_to_be_exact_everywhere_is_not_taken_at_its_word(tmp_path, monkeypatch):
    """The exactness label is metadata a file can carry falsely (its checksum edited with it): on a CPU whose
    runtimes saturate, a graph with 8-bit x 8-bit layers is exported again whatever the file claims."""
    from fxopt.kernels import cpu_isa
    torch.manual_seed(0)
    with cpu_isa.forced("vnni"):
        r = _compile(DemoNet().eval(), (demo_inputs(4),), "int8-dynamic", runtime="onnxruntime")
    fxopt.save(r, tmp_path / "here.fxopt")
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: True)
    model = onnx_export.onnx_bytes(r.graph_module, portable=False)
    import onnx
    proto = onnx.load_from_string(model)
    next(p for p in proto.metadata_props if p.key == onnx_export.EXACT_KEY).value = "any"  # the false claim
    _rewrite(tmp_path / "here.fxopt", tmp_path / "lying.fxopt", onnx_bytes=proto.SerializeToString())
    monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda: False)
    loaded = fxopt.load(tmp_path / "lying.fxopt")
    assert isinstance(loaded, RuntimeModule)
    signed = {t.name for t in onnx.load_from_string(loaded.artifact).graph.initializer
              if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    assert not signed & {str(n.args[1].target) for n in eight_bit_products(loaded.graph_module)[0]}


# ---------------------------------------------------------------- ONNX Runtime: small int8 convs, int8 adds
def _demo_int8(width=16, runtime="torch"):
    torch.manual_seed(0)
    m = DemoNet(width=width).eval()
    calib = [demo_inputs(16) for _ in range(4)]
    return m, _compile(m, (demo_inputs(16),), "int8", calibration=calib, runtime=runtime)


def _ort_run(data, x):
    from fxopt.runtime.engines import _ort_session
    sess = _ort_session(data, 2)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("plan, portable", [("vnni", True), ("avx2", False)])
def test_small_int8_convs_run_as_float_convs_on_the_same_values(plan, portable):
    """Both CPU plans on any machine: 8-bit codes on 8-bit weights (the portable file stores those weights
    as uint8 on zero point 128) and 7-bit weights kept int8."""
    import onnx
    from fxopt.kernels import cpu_isa
    from fxopt.runtime.onnx_prepare import float_convs, small_int8_convs
    with cpu_isa.forced(plan):
        _, q = _demo_int8()
    proto = onnx.load_from_string(onnx_export.onnx_bytes(q, portable=portable))
    # DemoNet's stem reads 1 channel (3x3: 9 products per output), its block convs 16 (144): only the stem
    found = small_int8_convs(proto)
    assert len(found) == 1
    stem = next(n for n in proto.graph.node if n.name == found[0])
    producer = {o: n for n in proto.graph.node for o in n.output}
    assert producer[stem.input[0]].op_type == "DequantizeLinear"
    swapped = float_convs(proto, found)
    conv = next(n for n in swapped.graph.node if n.name == found[0])
    assert {o: n for n in swapped.graph.node for o in n.output}[conv.input[0]].op_type == "Mul"
    assert small_int8_convs(swapped) == []  # done once: a saved, tuned file is not tuned again
    as_int8, as_float = proto.SerializeToString(), swapped.SerializeToString()
    # every input, not the example only: the same codes in, the same sum, one output code at a tie at most
    for x in (demo_inputs(16), demo_inputs(3) * 40, -demo_inputs(5), torch.zeros(2, 1, 8, 8),
              torch.full((2, 1, 8, 8), 1e4)):
        with torch.no_grad():
            want = q(x)
        a, b = _ort_run(as_int8, x), _ort_run(as_float, x)
        scale = float(want.abs().max()) + 1e-6
        assert float((b - a).abs().max()) <= 0.02 * scale, x.abs().max()
        assert float((b - want).abs().max()) <= 0.02 * scale


def test_onnxruntime_keeps_a_float_conv_only_where_the_model_measures_faster(monkeypatch):
    import onnx
    from fxopt.runtime import engines
    _, q = _demo_int8()
    data = onnx_export.onnx_bytes(q, portable=False)
    real = engines._ort_session
    for float_ms, kept in ((1.0, True), (1.99, False)):
        # a stand-in clock: the file with the float conv takes float_ms, the int8 one 2 ms
        monkeypatch.setattr(engines, "_ort_session", lambda d, t: (real(d, t), b"_float_dq" in d))
        monkeypatch.setattr(engines, "_warm", lambda s, feeds: s)
        monkeypatch.setattr(engines, "_median_ms", lambda s, feeds, calls: float_ms if s[1] else 2.0)
        out, info = engines.tune_onnxruntime(data, {"x": demo_inputs(16).numpy()}, 2)
        assert (b"_float_dq" in out) is kept
        (name, ms), = (info["float_convs"] if kept else info["int8_convs_kept"]).items()
        assert ms == [2.0, float_ms]
        # the decision travels in the file: a saved or copied model's file is not timed again
        monkeypatch.setattr(engines, "_median_ms", lambda *a: pytest.fail("a tuned file was timed again"))
        again, info2 = engines.tune_onnxruntime(out, {"x": demo_inputs(16).numpy()}, 2)
        assert again == out and info2 == info
    # a file whose decision is malformed (crafted) is timed again, its text never reaches the history
    import onnx
    for bad in ('{"float_convs": {"c": ["x", 1]}}', '[1, 2]', '{"run": "this"}', 'not json'):
        p = onnx.load_from_string(data)
        entry = p.metadata_props.add()
        entry.key, entry.value = engines.TUNED_KEY, bad
        monkeypatch.setattr(engines, "_median_ms", lambda s, feeds, calls: 1.0 if s[1] else 2.0)
        _, info3 = engines.tune_onnxruntime(p.SerializeToString(), {"x": demo_inputs(16).numpy()}, 2)
        assert list(info3["float_convs"].values()) == [[2.0, 1.0]], bad
    # a trial ONNX Runtime cannot load keeps the conv int8 and says why; the file still runs
    monkeypatch.setattr(engines, "_median_ms", lambda s, feeds, calls: 2.0)
    monkeypatch.setattr(engines, "_ort_session", lambda d, t: (_ for _ in ()).throw(RuntimeError("no kernel"))
                        if b"_float_dq" in d else (real(d, t), False))
    out, info = engines.tune_onnxruntime(data, {"x": demo_inputs(16).numpy()}, 2)
    assert b"_float_dq" not in out and "no kernel" in next(iter(info["float_convs_failed"].values()))
    monkeypatch.undo()
    # a real build: the record says what was timed, and the session runs what the graph computes
    r = _compile(DemoNet(width=16).eval(), (demo_inputs(16),), "int8", calibration=[demo_inputs(16)],
                 runtime="onnxruntime")
    timed = {**r.runtime_info.get("float_convs", {}), **r.runtime_info.get("int8_convs_kept", {})}
    assert len(timed) == 1 and all(len(v) == 2 for v in timed.values())
    # the history says which way each was run, with the times
    entry = r.fxopt_history.runtime["candidates"]["onnxruntime"]
    assert {**entry.get("float_convs", {}), **entry.get("int8_convs_kept", {})} == timed
    assert next(iter(timed)) in str(r.fxopt_history)
    x = demo_inputs(7)
    assert select.agreement(r.graph_module(x), r(x))[0] < 2e-2
    import copy
    import fxopt.runtime.engines as engines
    orig = engines._median_ms
    try:  # a copy (and a loaded model) rebuilds its session from the tuned file without timing it again
        engines._median_ms = lambda *a: pytest.fail("a tuned file was timed again")
        twin = copy.deepcopy(r)
    finally:
        engines._median_ms = orig
    assert twin.artifact == r.artifact and twin.runtime_info.get("float_convs") == r.runtime_info.get("float_convs")


def test_onnxruntime_runs_the_last_residual_sum_as_an_int8_add(tmp_path):
    from models import TwoBlocks
    import onnxruntime as ort
    torch.manual_seed(0)
    m, x = TwoBlocks().eval(), torch.rand(2, 3, 10, 10)
    for runtime, fused in (("onnxruntime", True), ("torch", False)):  # residuals=auto follows the runtime
        q = _compile(m, (x,), "int8", calibration=[torch.rand(2, 3, 10, 10) for _ in range(3)], runtime=runtime)
        path = str(tmp_path / f"{runtime}.onnx")
        fxopt.export_onnx(getattr(q, "graph_module", q), path, portable=False)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{runtime}.opt.onnx")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        import onnx
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        # both adds int8 (QLinearAdd) where the identity and the last sum are quantized; in float otherwise
        assert (ops.count("QLinearAdd") == 2) is fused, ops
        if fused:
            assert ops.count("Add") <= 1, ops  # (the head's bias add may remain)


def test_auto_times_each_runtime_in_steady_state_not_right_after_another():
    import time
    last = []

    def make(name, own_s, switch_s):
        def call():
            time.sleep(own_s + (switch_s if last and last[-1] != name else 0.0))
            last.append(name)
        return call
    # "b" pays 15 ms on the first call after "a" ran (threads waking, caches refilled), 2 ms after that;
    # "a" takes 4 ms every call: b is the faster model to call again and again
    ms = select._interleaved_ms({"a": make("a", 0.004, 0.0), "b": make("b", 0.002, 0.015)}, repeats=4)
    assert ms["b"] < ms["a"] < 10, ms
    assert 1.5 < ms["b"] < 8 and ms["a"] >= 3.5, ms

import pytest
import torch

import fxopt
from fxopt.ir.dialect import is_conv, is_linear, module_path
from models import MLP, Branchy, DictOut, ResCNN, state_hash


def test_trace_matches_eager_and_is_canonical():
    model = ResCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.trace(model, (x,))
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    # functional: no in-place ATen ops survive canonicalization
    assert not any(getattr(t, "_schema", None) is not None and t._schema.is_mutable for t in ops)
    assert sum(is_conv(n) for n in gm.graph.nodes) == 2
    assert sum(is_linear(n) for n in gm.graph.nodes) == 1


def test_names_follow_module_paths():
    gm = fxopt.trace(ResCNN().eval(), torch.randn(1, 3, 8, 8))
    params = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert params["conv1_weight"] == "conv1.weight"
    convs = [n for n in gm.graph.nodes if is_conv(n)]
    assert [module_path(n) for n in convs] == ["conv1", "conv2"]
    assert convs[0].name.startswith("conv1_")


def test_batch_dimension_is_symbolic_even_from_batch_one():
    model = ResCNN().eval()
    gm = fxopt.trace(model, torch.randn(1, 3, 8, 8))
    for b in (1, 7):
        x = torch.randn(b, 3, 8, 8)
        assert torch.allclose(gm(x), model(x), atol=1e-6)
    x_val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    assert isinstance(x_val.shape[0], torch.SymInt) and isinstance(x_val.shape[1], int)


def test_static_shapes_reject_other_shapes_with_input_error():
    gm = fxopt.trace(MLP(), torch.randn(4, 16), dynamic=False)
    with pytest.raises(fxopt.InputError, match="dynamic=True"):
        gm(torch.randn(5, 16))


def test_keyword_inputs_and_structured_outputs():
    model = DictOut().eval()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    gm = fxopt.trace(model, kwargs={"input_ids": ids, "attention_mask": mask}, dynamic=True)
    ids2 = torch.randint(0, 50, (3, 9))
    mask2 = torch.randint(0, 2, (3, 9))
    out, ref = gm(input_ids=ids2, attention_mask=mask2), model(input_ids=ids2, attention_mask=mask2)
    assert isinstance(out, dict) and isinstance(out["pooled"], tuple)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["pooled"][1], ref["pooled"][1])


def test_trace_does_not_touch_the_model():
    model = ResCNN().train()
    before = state_hash(model)
    fxopt.trace(model, torch.randn(2, 3, 8, 8))
    assert state_hash(model) == before


def test_trace_error_names_module_line_and_remedy():
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(Branchy(), torch.randn(2, 4))
    err = info.value
    assert err.module == "gate"
    assert err.location.endswith(f"models.py:{_line_of('if x.sum() > 0')}")
    assert "if x.sum() > 0" in err.source
    assert "backend='fxopt'" in err.remedy
    assert "tensor values" in str(err)


def _line_of(text: str) -> int:
    import models
    with open(models.__file__) as f:
        for i, line in enumerate(f, 1):
            if text in line:
                return i
    raise AssertionError(text)


@pytest.mark.parametrize("bad", [None, "model", 3])
def test_non_module_is_an_input_error(bad):
    with pytest.raises(fxopt.InputError, match="nn.Module"):
        fxopt.trace(bad, torch.randn(1))


def test_minilm_bert_with_keyword_inputs(minilm):
    model, kw = minilm
    with pytest.raises(Exception):  # the plain fx front-end cannot capture it
        torch.fx.symbolic_trace(model)
    gm = fxopt.trace(model, kwargs=kw, dynamic=True)
    ids = torch.randint(0, 30000, (3, 40))
    kw2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out, ref = gm(**kw2), model(**kw2)
    assert type(out) is type(ref)
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    names = {n.name for n in gm.graph.nodes}
    assert "encoder_layer_0_attention_self_query_weight" in names


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models(torchvision_models, name):
    model = getattr(torchvision_models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = fxopt.trace(model, (x,))
    assert torch.allclose(gm(x), model(x), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0",
                                  "efficientnet_b0", "regnet_y_400mf", "vit_b_16", "swin_t",
                                  "convnext_tiny", "mnasnet0_5"])
def test_torchvision_zoo(torchvision_models, name):
    model = getattr(torchvision_models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = fxopt.trace(model, (x,))
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)


def test_trace_leaves_the_inputs_alone():
    x = torch.randn(2, 16)
    before = x.clone()
    fxopt.trace(MLP(), (x,))
    assert torch.equal(x, before)
    assert not getattr(x, "_dynamo_dynamic_indices", None)  # export did not tag the user's tensor


class Attn(torch.nn.Module):
    def __init__(self, batch_first=True, **kw):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)

    def forward(self, x, kv, **kw):
        return self.mha(x, kv, kv, **kw)


MHA_CASES = [
    ({}, {"need_weights": False}),
    ({}, {}),                                                 # averaged weights returned
    ({"batch_first": False}, {"average_attn_weights": False}),
    ({"bias": False, "kdim": 8, "vdim": 12}, {"need_weights": False}),   # separate projection weights
    ({}, {"need_weights": False, "key_padding_mask": "kpm"}),
    ({}, {"attn_mask": "bool2d"}),
    ({}, {"need_weights": False, "attn_mask": "float3d"}),
    ({}, {"need_weights": False, "attn_mask": "causal", "is_causal": True}),
]


@pytest.mark.parametrize("ctor,call", [c for c in MHA_CASES if c[0].get("batch_first", True) and
                                       c[1].get("key_padding_mask") is None and c[1].get("attn_mask") != "float3d"])
def test_multihead_attention_captures_batch_polymorphic_and_exact(ctor, call):
    """nn.MultiheadAttention is captured through fxopt's batch-first equivalent: the graph
    matches the module at other batch sizes, including 1 (plain export pins it)."""
    torch.manual_seed(0)
    model = Attn(**ctor).eval()
    kdim = ctor.get("kdim", 16)

    def inputs(b):
        bf = ctor.get("batch_first", True)
        x = torch.randn(b, 5, 16) if bf else torch.randn(5, b, 16)
        kv = torch.randn(b, 6, kdim) if bf else torch.randn(6, b, kdim)
        kw = dict(call)
        masks = {"kpm": torch.arange(6).expand(b, 6) >= 4, "bool2d": torch.rand(5, 6) > 0.7,
                 "float3d": torch.randn(b * 4, 5, 6), "causal": torch.ones(5, 6).triu(1).bool()}  # no key after the query
        for k, v in kw.items():
            if isinstance(v, str):
                kw[k] = masks[v]
        if ctor.get("vdim"):
            kv = (kv, torch.randn(kv.shape[:-1] + (ctor["vdim"],)))
        return x, kv, kw

    class Wrap(torch.nn.Module):
        def __init__(self, m, kw):
            super().__init__()
            self.m, self.kw = m, kw

        def forward(self, x, k, v):
            return self.m.mha(x, k, v, **self.kw)

    x, kv, kw = inputs(2)
    k, v = kv if isinstance(kv, tuple) else (kv, kv)
    wrapped = Wrap(model, kw)
    gm = fxopt.trace(wrapped, (x, k, v))
    for b in (1, 3):
        xb, kvb, _ = inputs(b)
        kb, vb = kvb if isinstance(kvb, tuple) else (kvb, kvb)
        got, want = gm(xb, kb, vb), wrapped(xb, kb, vb)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctor,call", MHA_CASES)
def test_batch_first_attention_equals_torch_function(ctor, call):
    """fxopt's equivalent against F.multi_head_attention_forward, masks included."""
    from fxopt.ir.capture_rewrites import ExportFriendly
    torch.manual_seed(0)
    model = Attn(**ctor).eval()
    b, kdim = 3, ctor.get("kdim", 16)
    bf = ctor.get("batch_first", True)
    x = torch.randn(b, 5, 16) if bf else torch.randn(5, b, 16)
    k = torch.randn(b, 6, kdim) if bf else torch.randn(6, b, kdim)
    v = torch.randn(k.shape[:-1] + (ctor.get("vdim", kdim),))
    masks = {"kpm": torch.arange(6).expand(b, 6) >= 4, "bool2d": torch.rand(5, 6) > 0.7,
             "float3d": torch.randn(b * 4, 5, 6), "causal": torch.ones(5, 6).triu(1).bool()}
    kw = {n: masks[t] if isinstance(t, str) else t for n, t in call.items()}
    want = model.mha(x, k, v, **kw)
    with ExportFriendly():
        got = model.mha(x, k, v, **kw)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_vit_swin_convnext_run_at_any_batch_size(torchvision_models):
    """Each pins the batch under plain torch.export (attention, pooling / a conv of a permuted tensor)."""
    for name, size in (("vit_b_16", 224), ("swin_t", 224), ("convnext_tiny", 64)):
        model = getattr(torchvision_models, name)().eval()
        gm = fxopt.trace(model, (torch.randn(2, 3, size, size),))
        x = torch.randn(1, 3, size, size)
        torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)


def test_packed_attention_weights_become_one_parameter_per_projection():
    """in_proj_weight is unpacked at capture, so every pass sees four plain linears."""
    torch.manual_seed(0)
    model = Attn().eval()
    x = torch.randn(2, 5, 16)

    class Self(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = model

        def forward(self, x):
            return self.a.mha(x, x, x, need_weights=False)[0]
    m = Self()
    gm = fxopt.trace(m, (x,))
    shapes = sorted(tuple(p.shape) for p in gm.parameters())
    assert shapes == sorted([(16, 16)] * 4 + [(16,)] * 4)
    assert not any(n.target is torch.ops.aten.split.Tensor for n in gm.graph.nodes)
    out = fxopt.compile(m, (x,), recipe="int8-dynamic")
    assert sum(n.target is torch.ops.fxopt.linear_int8_dynamic.default for n in out.graph.nodes) == 4
    assert model.mha.in_proj_weight.shape == (48, 16)


# --- token inputs: the sequence dimension is symbolic by default ---------------------------------

def test_token_inputs_have_a_symbolic_sequence_by_default():
    """Compiled on 8x128 token batches, called with a 3x40 one: no dynamic=True needed."""
    model = DictOut().eval()
    ids = torch.randint(0, 50, (8, 128))
    gm = fxopt.trace(model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    assert all(isinstance(s, torch.SymInt) for s in val.shape)
    ids2 = torch.randint(0, 50, (3, 40))
    mask2 = torch.randint(0, 2, (3, 40))
    out, ref = gm(input_ids=ids2, attention_mask=mask2), model(input_ids=ids2, attention_mask=mask2)
    assert torch.equal(out["logits"], ref["logits"])
    batch_only = fxopt.trace(model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             dynamic="batch")
    with pytest.raises(fxopt.InputError, match="'input_ids' has size 40 in dimension 1"):
        batch_only(input_ids=ids2, attention_mask=mask2)


def test_token_inputs_by_position_and_other_names_keep_their_rules():
    """Names come from the forward signature for positional inputs too; other inputs keep a
    symbolic batch only, and a [B, 1, S, S] mask keeps its broadcast dimension."""
    from fxopt.ir.capture import dynamic_shapes_for

    class M(torch.nn.Module):
        def forward(self, input_ids, features, attention_mask):
            return input_ids, features, attention_mask
    args = (torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7), torch.zeros(2, 1, 7, 7))
    spec = dynamic_shapes_for(M(), args, {}, None)
    assert [sorted(s) for s in spec] == [[0, 1], [0], [0, 2, 3]]
    assert [sorted(s) for s in dynamic_shapes_for(M(), args, {}, "batch")] == [[0], [0], [0]]


def test_sequence_that_cannot_be_symbolic_falls_back_to_the_batch(monkeypatch):
    import fxopt.ir.capture as capture
    real = capture._export

    def export(model, args, kwargs, dyn):
        if any(1 in (s or {}) for s in dyn.values()):
            raise RuntimeError("pretend the model pins the sequence")
        return real(model, args, kwargs, dyn)
    monkeypatch.setattr(capture, "_export", export)
    ids = torch.randint(0, 50, (2, 5))
    gm = fxopt.trace(DictOut().eval(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert gm.meta["fxopt_capture"]["dynamic"] == "batch"
    assert gm(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]))["logits"].shape == (1, 5, 3)


# --- calls that do not fit what was captured raise InputError naming the input -------------------

@pytest.fixture(scope="module")
def dict_gm():
    ids = torch.randint(0, 50, (2, 5))
    return fxopt.trace(DictOut().eval(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


_IDS = torch.randint(0, 50, (2, 5))
_MASK = torch.ones(2, 5, dtype=torch.long)
BAD_CALLS = [
    ((), {"input_ids": _IDS[0], "attention_mask": _MASK[0]}, r"'input_ids' has 1 dimension.*unsqueeze\(0\)"),
    ((), {"input_ids": _IDS, "attention_mask": None}, r"'attention_mask' is None.*int64 tensor of shape"),
    ((), {"input_ids": _IDS.tolist(), "attention_mask": _MASK}, r"'input_ids' is a list.*torch.tensor"),
    ((), {"input_ids": _IDS.float(), "attention_mask": _MASK}, r"'input_ids' is float32.*\.to\(torch.int64\)"),
    ((), {"input_ids": _IDS}, r"missing keyword input\(s\) 'attention_mask'"),
    ((), {"input_ids": _IDS, "attention_mask": _MASK, "labels": _IDS}, r"unexpected keyword input\(s\) 'labels'"),
    ((_IDS, _MASK, _IDS), {}, r"takes 0 positional input\(s\) and got 3"),
    ((), {"input_ids": _IDS, "attention_mask": _MASK.numpy()}, r"'attention_mask' is a numpy.ndarray"),
]


@pytest.mark.parametrize("args,kwargs,match", BAD_CALLS)
def test_bad_calls_are_input_errors_naming_the_input(dict_gm, args, kwargs, match):
    with pytest.raises(fxopt.InputError, match=match):
        dict_gm(*args, **kwargs)


def test_positional_and_keyword_inputs_map_as_in_the_original(dict_gm):
    ref = dict_gm(input_ids=_IDS, attention_mask=_MASK)["logits"]
    assert torch.equal(dict_gm(_IDS, _MASK)["logits"], ref)                       # captured by keyword
    gm = fxopt.trace(MLP(), (torch.randn(4, 16),))
    x = torch.randn(3, 16)
    assert torch.equal(gm(x=x), gm(x))                                          # captured by position


def test_input_checks_survive_a_deep_copy(dict_gm):
    import copy
    dup = copy.deepcopy(dict_gm)
    with pytest.raises(fxopt.InputError, match="'attention_mask' is None"):
        dup(input_ids=_IDS, attention_mask=None)
    assert torch.equal(dup(_IDS, _MASK)["logits"], dict_gm(_IDS, _MASK)["logits"])


def test_constants_and_empty_batches():
    class Flag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, double=False):
            y = self.fc(x)
            return y * 2 if double else y.view(y.shape[0], -1, 2).sum(-1)   # view(-1) fails on empty
    gm = fxopt.trace(Flag(), (torch.randn(2, 4),), {"double": True})
    with pytest.raises(fxopt.InputError, match="'double' is False.*compiled with True"):
        gm(torch.randn(2, 4), double=False)
    assert gm(torch.randn(0, 4), double=True).shape == (0, 4)   # empty batches run where the graph allows
    plain = fxopt.trace(Flag(), (torch.randn(2, 4),))
    with pytest.raises(fxopt.InputError, match="'x' is empty.*skip empty batches"):
        plain(torch.randn(0, 4))


def test_static_size_mismatch_names_the_dimension():
    gm = fxopt.trace(MLP(), torch.randn(4, 16))
    with pytest.raises(fxopt.InputError, match=r"'x' has size 15 in dimension 1.*fixed at 16"):
        gm(torch.randn(4, 15))


def test_meta_device_models_and_inputs_say_to_materialize():
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(fxopt.InputError, match=r"parameter 'fc1.weight' is on the meta device.*to_empty"):
        fxopt.trace(model, (torch.randn(2, 16),))
    with pytest.raises(fxopt.InputError, match=r"args\[0\] is on the meta device.*to_empty"):
        fxopt.compile(model, (torch.randn(2, 16, device="meta"),))
    gm = fxopt.trace(model, (torch.randn(2, 16, device="meta"),))   # structure only: allowed
    assert gm(torch.randn(3, 16, device="meta")).shape == (3, 4)
    model.to_empty(device="cpu").load_state_dict(MLP().state_dict())
    assert fxopt.compile(model, (torch.randn(2, 16),))(torch.randn(3, 16)).shape == (3, 4)


@pytest.mark.slow
def test_attention_views_do_not_depend_on_the_kernels_strides(tmp_path):
    """sdpa's output is [B, S, H, D]-strided from the fused CPU kernel and contiguous from the
    math kernel (grad enabled): T5's transpose(1, 2).view(...) captured on one failed on the other."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=2, num_decoder_layers=2, num_heads=2, d_model=32, d_kv=16,
                                   d_ff=64, vocab_size=100)
    model = transformers.T5Model(config).eval()
    kw = {"input_ids": torch.randint(0, 100, (2, 10)), "decoder_input_ids": torch.randint(0, 100, (2, 6))}
    fast = fxopt.compile(model, kwargs=kw)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    after = [u for n in fast.graph.nodes if n.target is sdpa for u in n.users]
    assert after and not any(u.target is torch.ops.aten.view.default for u in after)
    with torch.enable_grad():
        got = fast(**kw).last_hidden_state
    want = model(**kw).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fxopt.save(fast, tmp_path / "t5.fxopt")          # its re-export traces the other kernel's strides
    assert (tmp_path / "t5.fxopt").stat().st_size > 0

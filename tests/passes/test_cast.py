"""The ``cast`` pass and the fp16/bf16 recipes: float32 islands, casts only at boundaries."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.dialect import op_name
from models import state_hash


def _dtypes(gm):
    return {n.name: (op_name(n), n.meta["val"].dtype) for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}


def _casts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default]


def _insist(recipe: str) -> str:
    """The recipe with cast(decline=never): these tests check what the cast does, not whether this CPU
    runs it faster (test_cast_declines_layers_measured_slower_unless_insisted checks that)."""
    import re
    if recipe in fxopt.recipes:
        recipe = fxopt.recipes[recipe].pipeline
    return re.sub(r"cast\(([^)]*)\)", lambda m: f"cast({m.group(1)},decline=never)", recipe)


def _compile(model, args=(), kwargs=None, recipe="bf16"):
    recipe = _insist(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a rolled-back pass warns: fail on it
        warnings.simplefilter("ignore", FutureWarning)   # torch 2.13's export warns about its own pytree API
        warnings.simplefilter("ignore", DeprecationWarning)
        return fxopt.compile(model, args, kwargs, recipe=recipe)


def test_an_mlp_casts_only_at_the_input_and_output():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    q = _compile(model, (x,))
    assert len(_casts(q)) == 2
    assert all(d == torch.bfloat16 for name, (op, d) in _dtypes(q).items() if op in ("linear", "gelu"))
    assert q(x).dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in q.parameters())  # weights stored in bf16
    torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("recipe, min_cos", [("bf16", 0.99), ("fp16", 0.999)])
def test_minilm_keeps_islands_in_float32(minilm, recipe, min_cos):
    model, kw = minilm
    before = state_hash(model)
    q = _compile(model, kwargs=kw, recipe=recipe)
    assert state_hash(model) == before
    low = torch.bfloat16 if recipe == "bf16" else torch.float16
    ops = _dtypes(q)
    seen = {op for op, _ in ops.values()}
    assert {"layer_norm", "linear"} <= seen
    for name, (op, d) in ops.items():
        if op in ("layer_norm", "softmax", "_softmax", "sum", "mean"):
            assert d == torch.float32, (name, op, d)
        if op == "linear":
            assert d == low, (name, d)
    # every cast sits on an island boundary: a float32 <-> low transition
    for c in _casts(q):
        src = c.args[0].meta["val"].dtype
        if src.is_floating_point and c.meta["val"].dtype.is_floating_point:
            assert {src, c.meta["val"].dtype} == {torch.float32, low}
    out = q(**kw)
    h = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    assert h.dtype == torch.float32
    ref = model(**kw).last_hidden_state
    cos = nn.functional.cosine_similarity(h.flatten(1), ref.flatten(1)).min()
    assert cos > min_cos
    bytes_ratio = fxopt.ir.graph_utils.param_stats(q)[1] / fxopt.ir.graph_utils.param_stats(model)[1]
    assert bytes_ratio < 0.51


def test_keep_list_and_integer_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, ids):
            return self.head(torch.relu(self.fc(self.emb(ids))))

    ids = torch.randint(0, 10, (3, 5))
    q = _compile(Net().eval(), (ids,), recipe="cast(dtype=bf16,keep=[head])")
    ops = _dtypes(q)
    assert ops["head_linear"][1] == torch.float32 and ops["fc_linear"][1] == torch.bfloat16
    assert q.emb.weight.dtype == torch.bfloat16 and q.head.weight.dtype == torch.float32
    assert q(ids).dtype == torch.float32
    q = _compile(Net().eval(), (ids,), recipe="cast(dtype=fp16,keep=[relu])")
    assert _dtypes(q)["relu"][1] == torch.float32


def test_bad_dtype():
    with pytest.raises(fxopt.RecipeError, match="dtype must be one of"):
        fxopt.compile(nn.Linear(2, 2), (torch.randn(1, 2),), recipe="cast(dtype=int8)")


class MinMasked(nn.Module):
    """Attention-style masks built from float32's minimum, three ways."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("neg", torch.tensor(torch.finfo(torch.float32).min))

    def forward(self, x, mask):
        s = self.fc(x)
        a = s.masked_fill(~mask, torch.finfo(torch.float32).min)          # DeBERTa
        b = s + (1.0 - mask.to(s.dtype)) * torch.finfo(torch.float32).min  # BERT's additive mask
        c = torch.where(mask, s, self.neg)                                 # a constant buffer
        return torch.softmax(a, -1) + torch.softmax(b, -1) + torch.softmax(c, -1)


@pytest.mark.parametrize("recipe", ["bf16", "fp16"])
def test_float32_minimum_constants_are_clamped_to_the_low_dtype(recipe):
    torch.manual_seed(0)
    model = MinMasked().eval()
    x, mask = torch.randn(3, 8), torch.rand(3, 8) > 0.4
    mask[:, 0] = True
    q = _compile(model, (x, mask), recipe=recipe)
    rec = next(r for r in q.fxopt_history.records if r.name == "cast")
    assert rec.status == "changed" and rec.info["constants_clamped"] >= 2
    out = q(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, mask), atol=0.05, rtol=0.05)


def test_deberta_runs_in_bf16():
    """DeBERTa masks its attention scores with masked_fill(finfo(float32).min): -inf/NaN in bf16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                          intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                          relative_attention=True, position_buckets=16, max_relative_positions=32,
                                          pos_att_type=["p2c", "c2p"])
    model = transformers.DebertaV2Model(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0                                                        # padding: masked scores
    q = _compile(model, kwargs={"input_ids": ids, "attention_mask": mask})
    rec = next(r for r in q.fxopt_history.records if r.name == "cast")
    assert rec.status == "changed", rec.error
    with torch.no_grad():
        got = q(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_cast_declines_layers_measured_slower_unless_insisted(monkeypatch):
    """On a CPU without bf16 instructions bf16 GEMMs are emulated: each layer measured slower stays float32
    (the history says why), all of them: the pass changes nothing; decline=never casts anyway."""
    import warnings
    from fxopt.passes.quant import cast as cast_mod
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    monkeypatch.setattr(cast_mod, "_time_layer", lambda gm, node, low: (1.0, 3.0))   # an AVX2-only CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxopt.compile(model, (x,), recipe="cast(dtype=bf16)")
    rec = out.fxopt_history.records[0]
    assert rec.status == "unchanged" and "slower in bfloat16" in rec.info["why"]
    assert sorted(rec.info["declined"]) == ["_0_linear", "_2_linear"] or len(rec.info["declined"]) == 2
    assert all(p.dtype == torch.float32 for p in out.parameters())
    forced = fxopt.compile(model, (x,), recipe="cast(dtype=bf16,decline=never)")
    assert forced.fxopt_history.records[0].status == "changed"
    # one layer slower, one faster: only the slow one stays float32
    calls = iter([(1.0, 3.0), (1.0, 0.5)])
    monkeypatch.setattr(cast_mod, "_time_layer", lambda gm, node, low: next(calls))
    mixed = fxopt.compile(model, (x,), recipe="cast(dtype=bf16)")
    rec = mixed.fxopt_history.records[0]
    assert rec.status == "changed" and len(rec.info["declined"]) == 1
    torch.testing.assert_close(mixed(x), model(x), atol=0.1, rtol=0.05)


def test_cast_times_each_compute_layer_on_this_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    out = fxopt.compile(model, (torch.randn(16, 64),), recipe="cast(dtype=bf16)")
    rec = out.fxopt_history.records[0]
    timed = rec.info.get("layer_ms") or {}
    assert len(timed) + len(rec.info.get("declined", {})) >= 2 or "why" in rec.info

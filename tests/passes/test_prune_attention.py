"""Structured pruning of attention: heads pruned whole in every form fxopt captures."""
import torch
from torch import nn

import fxopt
from models import prune, state_hash, widths


class HeadAttention(nn.Module):
    """Multi-head self-attention written the BERT way: separate Q, K, V, views to heads, sdpa."""

    def __init__(self, e=16, h=4):
        super().__init__()
        self.h, self.d = h, e // h
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        b, t, e = x.shape

        def heads(y):
            return y.view(b, t, self.h, self.d).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return x + self.o(a.transpose(1, 2).reshape(b, t, e))


def test_attention_heads_are_pruned_whole():
    torch.manual_seed(0)
    model = HeadAttention().eval()
    with torch.no_grad():  # heads 1 and 3 contribute nothing: removing them is exact
        for lin in (model.q, model.k, model.v):
            for h in (1, 3):
                lin.weight[h * 4:(h + 1) * 4] = 0
                lin.bias[h * 4:(h + 1) * 4] = 0
    x = torch.randn(2, 5, 16)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["q_linear"] == w["k_linear"] == w["v_linear"] == (8, 16) and w["o_linear"] == (16, 8)
    assert any("12" not in k and v == "4->2" for k, v in rec.info["channels"].items())
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    assert out(torch.randn(3, 5, 16)).shape == (3, 5, 16)   # the batch stays free (literal sizes rewritten)


def test_minilm_prune_50_prunes_heads_and_ffn(minilm):
    model, kw = minilm
    before = state_hash(model)
    out = fxopt.compile(model, kwargs=kw, recipe="prune-50", strict=True)
    rec = next(r for r in out.fxopt_history.records if r.name == "prune")
    assert rec.info["channels"]["encoder.layer.0.attention.self.query+encoder.layer.0.attention.self.key+"
                                "encoder.layer.0.attention.self.value"] == "12->6"
    assert rec.info["channels"]["encoder.layer.0.intermediate.dense"] == "1536->768"
    res = out(**kw)
    h = res["last_hidden_state"] if isinstance(res, dict) else res[0]
    assert h.shape == model(**kw).last_hidden_state.shape
    assert state_hash(model) == before


class TorchAttentionBlock(nn.Module):
    """ViT-style: nn.MultiheadAttention (packed in_proj_weight) in a pre-norm residual block."""

    def __init__(self, e=16, h=4):
        super().__init__()
        self.ln = nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(x.mean(1))


def test_packed_qkv_attention_heads_are_pruned_whole():
    torch.manual_seed(0)
    model = TorchAttentionBlock().eval()
    with torch.no_grad():  # heads 0 and 2 contribute nothing (in Q, K and V): removing them is exact
        for part in range(3):
            for h in (0, 2):
                rows = slice(part * 16 + h * 4, part * 16 + (h + 1) * 4)
                model.attn.in_proj_weight[rows] = 0
                model.attn.in_proj_bias[rows] = 0
    x = torch.randn(2, 5, 16)
    out, rec = prune(model, x)
    assert rec.info["channels"] == {"attn": "4->2"}
    shapes = sorted(tuple(p.shape) for n, p in out.named_parameters() if "in_proj" in n)
    assert shapes == [(8,)] * 3 + [(8, 16)] * 3
    assert widths(out)["attn_linear_3"] == (16, 8)          # the output projection reads 2 heads
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    assert model.attn.in_proj_weight.shape == (48, 16)       # the user's model keeps its heads


class MatmulAttention(HeadAttention):
    """The same attention written out: q @ k^T, a padding mask, softmax, @ v (no sdpa)."""

    def forward(self, x, mask):
        b, t, e = x.shape

        def heads(y):
            return y.view(b, t, self.h, self.d).transpose(1, 2)
        s = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / self.d ** 0.5
        a = torch.softmax(s + mask, dim=-1)
        return x + self.o((a @ heads(self.v(x))).transpose(1, 2).reshape(b, t, e))


def test_explicit_matmul_attention_heads_are_pruned_whole():
    torch.manual_seed(0)
    model = MatmulAttention().eval()
    with torch.no_grad():
        for lin in (model.q, model.k, model.v):
            for h in (1, 3):
                lin.weight[h * 4:(h + 1) * 4] = 0
                lin.bias[h * 4:(h + 1) * 4] = 0
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 1, 1, 5)
    mask[1, ..., 3:] = -1e9
    out = fxopt.compile(model, (x, mask), recipe="prune(ratio=0.5)", strict=True)
    w = widths(out)
    assert w["q_linear"] == w["k_linear"] == w["v_linear"] == (8, 16) and w["o_linear"] == (16, 8)
    torch.testing.assert_close(out(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def test_swin_window_attention_heads_are_pruned_whole(torchvision_models):
    """torchvision's shifted-window attention: a packed qkv linear split by reshape/permute/select,
    q @ k^T plus a per-head relative position bias (a parameter table), the shifted-window mask
    (head count in views), softmax @ v. Silent heads 0 and 2 must go and the output stay."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = ShiftedWindowAttention(16, [2, 2], [1, 1], num_heads=4)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head((x + self.attn(x)).mean(dim=(1, 2)))
    model = Block().eval()
    with torch.no_grad():
        for part in range(3):
            for h in (0, 2):
                rows = slice(part * 16 + h * 4, part * 16 + (h + 1) * 4)
                model.attn.qkv.weight[rows] = 0
                model.attn.qkv.bias[rows] = 0
    x = torch.randn(2, 4, 4, 16)
    out, rec = prune(model, x)
    assert list(rec.info["channels"].values()) == ["4->2"]
    shapes = {n: tuple(p.shape) for n, p in out.named_parameters()}
    assert shapes["attn_relative_position_bias_table_pruned"] == (9, 2)
    assert widths(out)["attn_linear_1"] == (16, 8)     # the output projection reads 2 heads
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


class PartialRotary(HeadAttention):
    """Phi's partial rotary embedding: the first half of every head's features of Q and K is
    rotated (rotate_half and a cat), the rest passes through, and the two are concatenated back."""

    def forward(self, x):
        b, t, e = x.shape
        half = self.d // 2
        pos = torch.arange(t, dtype=x.dtype)[:, None] * torch.ones(half)
        cos, sin = pos.cos(), pos.sin()

        def heads(y):
            return y.view(b, t, -1, self.d).transpose(1, 2)

        def rope(y):
            rot, rest = y[..., :half], y[..., half:]
            turned = torch.cat((-rot[..., half // 2:], rot[..., :half // 2]), dim=-1)
            return torch.cat((rot * cos + turned * sin, rest), dim=-1)
        q, k, v = rope(heads(self.q(x))), rope(heads(self.k(x))), heads(self.v(x))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, t, e))


def test_partial_rotary_heads_are_pruned_with_their_values():
    """Q/K went through a slice/cat the channel groups did not know, so only V's heads were cut."""
    torch.manual_seed(0)
    model = PartialRotary().eval()
    with torch.no_grad():
        for lin in (model.q, model.k, model.v):
            lin.weight[4:8] = 0
            lin.bias[4:8] = 0
    x = torch.randn(2, 5, 16)
    out, rec = prune(model, x, recipe="prune(ratio=0.25)")
    w = widths(out)
    assert w["q_linear"] == w["k_linear"] == w["v_linear"] == (12, 16) and w["o_linear"] == (16, 12)
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    assert out(torch.randn(3, 5, 16)).shape == (3, 5, 16)


class CatHeads(HeadAttention):
    """Q's heads concatenated from two projections (a layout on the head dim): no rule knows
    an sdpa reading it, so K and V must stay whole too."""

    def __init__(self):
        super().__init__()
        self.q2 = nn.Linear(16, 8)
        self.q = nn.Linear(16, 8)

    def forward(self, x):
        b, t, e = x.shape

        def heads(y):
            return y.view(b, t, -1, self.d).transpose(1, 2)
        q = torch.cat((heads(self.q(x)), heads(self.q2(x))), dim=1)
        a = nn.functional.scaled_dot_product_attention(q, heads(self.k(x)), heads(self.v(x)))
        return x + self.o(a.transpose(1, 2).reshape(b, t, e))


def test_an_unknown_reader_of_a_layout_keeps_its_other_inputs_whole():
    torch.manual_seed(0)
    model = CatHeads().eval()
    x = torch.randn(2, 5, 16)
    out, rec = prune(model, x)
    w = widths(out)
    assert w["k_linear"] == w["v_linear"] == (16, 16)
    torch.testing.assert_close(out(x), model(x))


def test_phi_prune_50_prunes_query_key_and_value_heads_together():
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PhiConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                    intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                    partial_rotary_factor=0.5)
    model = transformers.PhiForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    out = fxopt.compile(model, kwargs={"input_ids": ids, "use_cache": False}, recipe="prune-50", strict=True)
    rec = next(r for r in out.fxopt_history.records if r.name == "prune")
    assert rec.info["channels"]["model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+"
                                "model.layers.0.self_attn.v_proj"] == "4->2"
    ids = torch.randint(0, 100, (3, 23))   # another batch and sequence length
    with torch.no_grad():
        got = out(input_ids=ids, use_cache=False).logits
    assert got.shape == (3, 23, 100) and torch.isfinite(got).all()

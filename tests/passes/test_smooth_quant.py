"""smooth-quant with shared weights: one scale per set of coupled inputs, or none."""
import pytest
import torch
from torch import nn

import fxopt


def _smooth(model, args=(), kwargs=None, recipe="smooth-quant(alpha=0.5)"):
    """strict: the manager raises if the pass changes the float outputs beyond its tolerance."""
    out = fxopt.compile(model, args, kwargs, recipe=recipe, strict=True)
    return out, next(r for r in out.fxopt_history.records if r.name == "smooth-quant")


class SharedLinear(nn.Module):
    """One linear read at two depths with different inputs, each behind its own norm."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.shared = nn.Linear(16, 16)
        with torch.no_grad():
            self.n2.weight.mul_(5)     # the second input's outliers differ from the first's

    def forward(self, x):
        h = self.shared(self.n1(x))
        return self.shared(self.n2(h + x))


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def test_a_weight_shared_by_linears_with_different_inputs_gets_one_scale():
    torch.manual_seed(0)
    model = SharedLinear().eval()
    x = torch.randn(4, 16) * torch.linspace(0.1, 8, 16)
    out, rec = _smooth(model, (x,))
    assert rec.status == "changed" and rec.info["shared"] == 1 and rec.info["groups"] == 2
    assert sum(p.dim() == 2 for p in out.parameters()) == 1       # still one weight, scaled once
    torch.testing.assert_close(out(x), model(x), atol=1e-4, rtol=1e-3)


def test_a_weight_another_op_reads_is_left_unsmoothed():
    torch.manual_seed(0)
    model = TiedHead().eval()
    ids = torch.randint(0, 30, (2, 7))
    out, rec = _smooth(model, (ids,))
    assert rec.status == "unchanged" and rec.info["left_out"] == 1
    torch.testing.assert_close(out(ids), model(ids))


transformers = pytest.importorskip("transformers")


def albert():
    torch.manual_seed(0)
    config = transformers.AlbertConfig(num_hidden_layers=3, num_attention_heads=2, hidden_size=32,
                                       intermediate_size=64, vocab_size=100, embedding_size=16,
                                       max_position_embeddings=64)
    return transformers.AlbertModel(config).eval()


def deberta():
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                          intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                          relative_attention=True, position_buckets=16, max_relative_positions=32,
                                          pos_att_type=["p2c", "c2p"], share_att_key=True,
                                          norm_rel_ebd="layer_norm")
    return transformers.DebertaV2Model(config).eval()


@pytest.mark.parametrize("make", [albert, deberta])
def test_shared_layers_and_relative_position_projections_smooth_exactly(make):
    """ALBERT applies one layer at every depth; DeBERTa's relative positions go through the
    key/query projections: smoothing them once per reader compounded the scales."""
    model = make()
    ids = torch.randint(0, 100, (2, 12))
    q, rec = _smooth(model, kwargs={"input_ids": ids}, recipe="int8-dynamic")   # strict: no rollback
    assert rec.status == "changed" and rec.info["shared"] >= 1
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        got, want = q(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999

"""Token batches regrouped by length (fxopt.train.batching) and the recovery call's defaults for them."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import InputError
from fxopt.train.batching import padding_fraction, rebatch_by_length


class _Encoder(nn.Module):
    """Token embeddings + absolute positions + one masked self-attention layer, called like a Hugging Face
    encoder: what a padded position holds must not reach the real tokens."""

    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(60, width)
        self.pos = nn.Embedding(32, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        h = self.layer(h, src_key_padding_mask=attention_mask == 0)
        return h + self.ffn(h)


def _batches(n=6, size=8, width=24, pad_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, width + 1, (size,), generator=g)
        mask = (torch.arange(width) < lengths[:, None]).long()
        ids = torch.randint(1, 60, (size, width), generator=g)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        out.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask})
    return out


def _sentences(batches):
    """Each sentence's real tokens (a tuple of ids), in any order."""
    return sorted(tuple(b["input_ids"][i, :int(b["attention_mask"][i].sum())].tolist())
                  for b in batches for i in range(b["input_ids"].shape[0]))


def _pooled(model, batches):
    """sentence -> its mean-pooled output over real tokens."""
    out = {}
    with torch.no_grad():
        for b in batches:
            h = model(**b)
            m = b["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            for i in range(h.shape[0]):
                out[tuple(b["input_ids"][i, :int(b["attention_mask"][i].sum())].tolist())] = pooled[i]
    return out


def test_regrouped_batches_hold_the_same_sentences_and_compute_the_same_outputs():
    data = _batches(pad_id=3)
    out, info = rebatch_by_length(data)
    assert info["rebatched"] and info["sentences"] == 48 and info["batches"] == 6 and info["batch_size"] == 8
    assert _sentences(out) == _sentences(data)
    assert info["padding_after"] < info["padding_before"] == pytest.approx(padding_fraction(data), abs=1e-4)
    assert all(set(b) == {"input_ids", "token_type_ids", "attention_mask"} for b in out)
    for b in out:   # right-padded with the batches' own padding value; each batch as wide as its longest sentence
        n = b["attention_mask"].sum(1)
        assert int(n.max()) == b["input_ids"].shape[1]
        assert bool((b["input_ids"][b["attention_mask"] == 0] == 3).all())
    torch.manual_seed(0)
    model = _Encoder().eval()
    want, got = _pooled(model, data), _pooled(model, out)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    again, _ = rebatch_by_length(data)   # seeded: the same batches every time
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out, again) for k in a)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(data, _batches(pad_id=3)) for k in a)   # input untouched


@pytest.mark.parametrize("case", ["left padding", "holes", "labels", "loader", "mixed pad", "float mask",
                                  "empty row", "other shape", "no padding", "keys differ", "no batches"])
def test_batches_that_cannot_be_regrouped_come_back_unchanged_with_the_reason(case):
    data = _batches(n=3)
    if case == "left padding":
        data = [{k: v.flip(1) for k, v in b.items()} for b in data]
    elif case == "holes":
        data[1]["attention_mask"][0, 0] = 0
    elif case == "labels":
        data = [(b, torch.zeros(8, dtype=torch.long)) for b in data]
    elif case == "loader":
        data = torch.utils.data.DataLoader(data, batch_size=None)
    elif case == "mixed pad":
        data[2]["input_ids"][data[2]["attention_mask"] == 0] = 7
    elif case == "float mask":
        for b in data:
            b["attention_mask"] = (1 - b["attention_mask"].float()) * -1e4
    elif case == "empty row":
        data[0]["attention_mask"][3] = 0
    elif case == "other shape":
        data[0]["pixel_values"] = torch.zeros(8, 3)
    elif case == "no padding":
        data = [{k: v[:, :2] for k, v in b.items()} for b in data]
    elif case == "keys differ":
        del data[1]["token_type_ids"]
    elif case == "no batches":
        data = []
    out, info = rebatch_by_length(data)
    assert out is data and not info["rebatched"] and info["why"]


def test_the_recovery_call_regroups_token_batches_and_trains_an_encoder_with_adamw():
    torch.manual_seed(0)
    model = _Encoder().eval()
    data = _batches(n=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fxopt.compile(model, kwargs=data[0], recipe="prune-50", recover={"data": data, "epochs": 1},
                        progress=False)
    stage = next(s for s in out.fxopt_history.stages if s["stage"] == "distill")
    assert stage["batching"]["rebatched"] and stage["batching"]["padding_after"] < stage["batching"]["padding_before"]
    assert stage["optimizer"] == "adamw, lr 0.0005"
    assert "regrouped by length" in str(out.fxopt_history) and "adamw" in str(out.fxopt_history)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the user's model untouched
    # the user's own options win; rebatch=False trains on the batches as given
    out = fxopt.compile(model, kwargs=data[0], recipe="prune-50", progress=False,
                        recover={"data": data, "epochs": 1, "optimizer": "sgd", "lr": 0.01, "rebatch": False})
    stage = next(s for s in out.fxopt_history.stages if s["stage"] == "distill")
    assert not stage["batching"]["rebatched"] and stage["optimizer"] == "sgd, lr 0.01"


def test_a_graph_captured_with_a_fixed_sequence_length_keeps_the_batches_as_given():
    """dynamic=False fixes every shape: regrouped batches would not run, so the recovery call trains on the
    batches as they came (and says why); rebatch=True then fails with the reason instead of mid-training."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    data = _batches(n=3)
    out = fxopt.compile(model, kwargs=data[0], recipe="prune-50", dynamic=False, progress=False,
                        recover={"data": data, "epochs": 1})
    stage = next(s for s in out.fxopt_history.stages if s["stage"] == "distill")
    assert not stage["batching"]["rebatched"] and "does not run on a regrouped batch" in stage["batching"]["why"]
    with pytest.raises(InputError, match="does not run on a regrouped batch"):
        fxopt.compile(model, kwargs=data[0], recipe="prune-50", dynamic=False, progress=False,
                      recover={"data": data, "epochs": 1, "rebatch": True})


def test_regrouped_batches_keep_the_datas_batch_sizes():
    data = _batches(n=3)
    data.append({k: v[:3] for k, v in _batches(n=1, seed=5)[0].items()})   # a last batch of 3
    out, _ = rebatch_by_length(data)
    assert sorted(b["input_ids"].shape[0] for b in out) == [3, 8, 8, 8]
    short = _batches(n=2)
    short[0]["attention_mask"][:, 1:] = 0   # eight one-token sentences: their batch is still 2 wide
    short[0]["input_ids"][:, 1:] = 0
    out, _ = rebatch_by_length(short)
    assert sorted(b["input_ids"].shape[1] for b in out)[0] == 2


def test_quantization_after_the_regrouped_distillation_calibrates_on_the_batches_as_given():
    """QAT gets the user's batches (regrouped QAT is not measured yet), the distillation before it the
    regrouped ones; rebatch=True on a recipe that does not compress says so before any work."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    data = _batches(n=2)
    out = fxopt.compile(model, kwargs=data[0], recipe="prune-50,int8-dynamic", progress=False,
                        recover={"data": data, "epochs": 1})
    stages = {s["stage"]: s for s in out.fxopt_history.stages}
    assert stages["distill"]["batching"]["rebatched"] and "qat" in stages
    with torch.no_grad():
        assert torch.isfinite(out(**data[1])).all()
    with pytest.raises(InputError, match="does not compress"):
        fxopt.compile(model, kwargs=data[0], recipe="int8-dynamic", progress=False,
                      recover={"data": data, "epochs": 1, "rebatch": True})


def test_rebatch_option_is_checked_before_any_work():
    model = _Encoder().eval()
    data = _batches(n=2)
    with pytest.raises(InputError, match="rebatch"):
        fxopt.compile(model, kwargs=data[0], recipe="prune-50", recover={"data": data, "rebatch": "yes"},
                      progress=False)
    left = [{k: v.flip(1) for k, v in b.items()} for b in data]
    with pytest.raises(InputError, match="right-padded"):
        fxopt.compile(model, kwargs=left[0], recipe="prune-50", recover={"data": left, "rebatch": True},
                      progress=False)


def test_rebatch_is_public_and_takes_a_batch_size():
    assert fxopt.rebatch_by_length is rebatch_by_length
    out, info = fxopt.rebatch_by_length(_batches(n=3), batch_size=5)
    assert [b["input_ids"].shape[0] for b in sorted(out, key=lambda b: b["input_ids"].shape[0])] == [4, 5, 5, 5, 5]
    assert info["batches"] == 5 and info["sentences"] == 24
    with pytest.raises(ValueError, match="batch_size"):
        rebatch_by_length(_batches(n=1), batch_size=0)


def test_calibration_takes_other_sequence_lengths_where_the_graph_does():
    """Calibration batches regrouped by length (other widths than the example's) calibrate a graph whose
    sequence length is symbolic; a graph captured with fixed shapes refuses them, saying how to compile."""
    import warnings
    torch.manual_seed(0)
    model = _Encoder().eval()
    data = _batches()
    regrouped, info = rebatch_by_length(data)
    assert {b["input_ids"].shape[1] for b in regrouped} != {24}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxopt.compile(model, kwargs=data[0], recipe="int8", calibration=regrouped, progress=False)
        assert any(str(n.target).startswith("fxopt.") for n in out.graph.nodes)
        for b in regrouped[:2]:
            got, want = out(**b), model(**b)
            assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)) > 0.99
        with pytest.raises(fxopt.CalibrationError, match="dynamic="):
            fxopt.compile(model, kwargs=data[0], recipe="int8", calibration=regrouped, dynamic=False,
                          progress=False, strict=True)

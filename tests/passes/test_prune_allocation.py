"""prune(allocation=sensitivity): per-group ratios from the measured damage of pruning each group alone
(passes/compress/prune_allocation.py)."""
import itertools
import random

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import RecipeError
from fxopt.passes.compress.prune_allocation import BUDGET_STEPS, choose_levels
from models import state_hash


class TwoBranch(nn.Module):
    """Two hidden groups of 32 side by side: 4 of branch a's channels carry its signal and 28 almost nothing
    (pruning most of it costs little), branch b's are all distinct functions of a 64-wide input (every
    channel it loses costs, and no re-fit brings it back)."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(64, 32), nn.Linear(32, 8)
        self.b1, self.b2 = nn.Linear(64, 32), nn.Linear(32, 8)
        with torch.no_grad():
            scale = torch.cat([torch.ones(4), torch.full((28,), 0.01)])[:, None]
            self.a1.weight.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * scale)
            self.a1.bias.zero_()

    def forward(self, x):
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 64, generator=g) for _ in range(n)]


def _record(m):
    return next(r for r in m.fxopt_history.records if r.name == "prune")


def test_choose_levels_is_the_least_damage_that_meets_the_budget():
    """The dynamic program against brute force over every combination (on its cost grid)."""
    rnd = random.Random(0)
    for _ in range(300):
        opts = [[(rnd.randint(1, 50), rnd.random(), (i, j)) for j in range(rnd.randint(1, 3))]
                for i in range(rnd.randint(1, 4))]
        budget = rnd.randint(1, 120)
        unit = budget / BUDGET_STEPS
        got = choose_levels(opts, budget)
        best = None
        for combo in itertools.product(*[[None] + o for o in opts]):
            units = sum(min(BUDGET_STEPS, int(x[0] / unit)) for x in combo if x)
            damage = sum(x[1] for x in combo if x)
            if units >= BUDGET_STEPS and (best is None or damage < best):
                best = damage
        if best is None:
            assert got is None
            continue
        picked = [x for grp in opts for x in grp if x[2] in got]
        assert len(picked) == sum(t is not None for t in got)
        assert sum(x[0] for x in picked) >= budget                 # the budget is always met
        assert sum(x[1] for x in picked) == pytest.approx(best, abs=1e-12)
    assert choose_levels([[(5, 0.1, "a")]], 10) is None          # cannot be met
    assert choose_levels([[(5, 0.1, "a")]], 0) == [None]          # nothing to remove


@pytest.mark.parametrize("reconstruct", [False, True])
def test_the_redundant_group_loses_more_and_the_model_stays_closer(reconstruct):
    torch.manual_seed(0)
    model = TwoBranch().eval()
    before = state_hash(model)
    data, test = _data(), torch.cat(_data(seed=1))
    opts = ",importance=activation,reconstruct=true" if reconstruct else ""
    uniform = fxopt.compile(model, (data[0],), recipe=f"prune(ratio=0.5{opts})", calibration=data, progress=False)
    sens = fxopt.compile(model, (data[0],), recipe=f"prune(ratio=0.5{opts},allocation=sensitivity)",
                         calibration=data, progress=False)
    info = _record(sens).info["allocation"]
    ratios = {k: v["ratio"] for k, v in info["groups"].items()}
    assert ratios["a1"] > 0.5 > ratios["b1"], ratios
    # at least the parameters the uniform ratio removes, and a smaller error on data neither saw
    assert info["params_removed"] >= info["params_removed_uniform"]
    assert sum(p.numel() for p in sens.parameters()) <= sum(p.numel() for p in uniform.parameters())
    with torch.no_grad():
        want = model(test)
    err = {n: float((m(test) - want).pow(2).mean().detach()) for n, m in (("uniform", uniform), ("sens", sens))}
    assert err["sens"] < 0.8 * err["uniform"], err
    assert info["summed_damage"] <= info["summed_damage_uniform"]
    assert info["trials"] > 0 and state_hash(model) == before


def test_ratios_entries_stay_fixed_and_bad_options_are_errors():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    data = _data()
    m = fxopt.compile(model, (data[0],), recipe="prune(ratio=0.5,allocation=sensitivity,ratios=['b1=0.25'])",
                      calibration=data, progress=False)
    info = _record(m).info
    assert info["channels"]["b1"] == "32->24"                         # its own ratio
    assert list(info["allocation"]["groups"]) == ["a1"]               # the only group allocated
    assert info["channels"]["a1"] == "32->16"                         # alone in the pool: it takes the ratio
    with pytest.raises(RecipeError, match="allocation must be uniform or sensitivity"):
        fxopt.compile(model, (data[0],), recipe="prune(allocation=measured)")
    with pytest.raises(RecipeError, match="scope=global"):
        fxopt.compile(model, (data[0],), recipe="prune(allocation=sensitivity,scope=global)")


class Tokens(nn.Module):
    """Called like a Hugging Face encoder; with ``garbage``, what it outputs at padding positions is huge and
    moves with every channel pruned."""

    def __init__(self, width=16, garbage=False):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.a = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))
        self.b = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))
        self.garbage = garbage

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        h = h + self.a(h)
        h = h + self.b(h)
        if self.garbage:
            h = h + 1e3 * (1 - attention_mask).unsqueeze(-1).float() * self.a(h).pow(2).sum(-1, keepdim=True)
        return h


def test_token_batches_of_any_length_and_padding_left_out():
    """Calibration batches shorter than the example run (a sentence corpus), and the damage is measured on
    real tokens: a model whose padding outputs are huge and move with pruning is allocated exactly alike."""
    g = torch.Generator().manual_seed(0)

    def batch(length):
        lengths = torch.randint(2, length + 1, (4,), generator=g)
        mask = (torch.arange(length) < lengths[:, None]).long()
        return {"input_ids": torch.randint(1, 50, (4, length), generator=g) * mask, "attention_mask": mask}
    data = [batch(12), batch(5), batch(7), batch(9)]
    infos = []
    for garbage in (False, True):
        torch.manual_seed(0)
        model = Tokens(garbage=garbage).eval()
        m = fxopt.compile(model, kwargs=data[0], recipe="prune(ratio=0.5,allocation=sensitivity)", calibration=data,
                          progress=False)
        infos.append(_record(m).info["allocation"])
    assert infos[0]["batches"] == 4 and set(infos[0]["groups"]) == {"a.0", "b.0"}
    assert infos[0]["groups"] == infos[1]["groups"]


def test_token_mask_reads_keep_masks_only():
    from fxopt.quant.calibrate import token_mask
    ints = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(token_mask({"attention_mask": ints}), ints.bool())
    assert torch.equal(token_mask({"attention_mask": ints.float()}), ints.bool())     # 0/1 floats keep
    additive = (1 - ints.float()) * -1e9                                             # 0 / -inf style: not a keep-mask
    assert token_mask({"attention_mask": additive}) is None
    assert token_mask({"attention_mask": ints[0]}) is None and token_mask(torch.ones(2, 3)) is None

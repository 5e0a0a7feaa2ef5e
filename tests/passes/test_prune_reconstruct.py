"""prune(importance=activation) and prune(reconstruct=true): data-aware channel choice and least-squares
re-fits of the layers reading pruned channels (passes/compress/prune_stats.py)."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import RecipeError
from fxopt.passes.compress.prune_stats import ReaderStats
from models import state_hash


class MLP(nn.Module):
    def __init__(self, d=16, h=32, out=4):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _correlated(n_batches=8, rows=64, d=16, seed=0):
    """Inputs on a low-dimensional subspace: hidden channels are correlated, so the kept ones can stand in
    for the removed ones (what a re-fit exploits)."""
    basis = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(rows, 4, generator=g) @ basis + 0.01 * torch.randn(rows, d, generator=g)
            for _ in range(n_batches)]


def _prune_record(m):
    return next(r for r in m.fxopt_history.records if r.name == "prune")


def _compile(model, data, recipe):
    return fxopt.compile(model, (data[0],), recipe=recipe, calibration=data, progress=False)


def test_reconstruction_brings_the_outputs_back_and_says_where():
    torch.manual_seed(0)
    model = MLP().eval()
    data = _correlated()
    before = state_hash(model)
    test = torch.cat(_correlated(seed=1))
    want = model(test)
    sliced = _compile(model, data, "prune(ratio=0.5,importance=activation)")
    refit = _compile(model, data, "prune(ratio=0.5,importance=activation,reconstruct=true)")
    err_sliced = (sliced(test) - want).pow(2).mean()
    err_refit = (refit(test) - want).pow(2).mean()
    assert err_refit < 0.2 * err_sliced          # on data neither saw
    info = _prune_record(refit).info
    assert set(info["reconstructed"]) == {"fc2", "fc3"} and info["not_reconstructed"] == {}
    assert all(0 <= v < 1 for v in info["reconstructed"].values())   # held-back error vs slicing's
    n = sum(p.numel() for p in refit.parameters())
    assert n == sum(p.numel() for p in sliced.parameters())           # the same shapes, other values
    assert state_hash(model) == before


def test_the_refit_is_the_ridge_least_squares_solution():
    """fc3 reads fc2's channels; its re-fit equals the closed-form solution on the same rows."""
    torch.manual_seed(0)
    model = MLP().eval()
    data = _correlated()
    out = _compile(model, data, "prune(ratio=0.5,importance=activation,reconstruct=true)")
    kept_w2 = [v for k, v in out.state_dict().items() if "fc2" in k and v.dim() == 2][0]
    # the Gram is taken on the original model's input to fc3
    h = torch.cat([torch.relu(model.fc2(torch.relu(model.fc1(x)))) for x in data]).double()
    target = model.fc3(h.float()).double()
    w3 = [v for k, v in out.state_dict().items() if "fc3" in k and v.dim() == 2][0]
    b3 = [v for k, v in out.state_dict().items() if "fc3" in k and v.dim() == 1][0]
    # which columns of the original fc3 are kept: the ones whose energy the activation score ranked highest
    score = model.fc3.weight.detach().double().pow(2).sum(0) * h.pow(2).mean(0)
    keep = torch.sort(torch.topk(score / score.mean(), 16).indices).values
    X = torch.cat([h[:, keep], torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    A = X.T @ X
    A.diagonal().add_(1e-3 * A.diagonal().mean())
    sol = torch.linalg.solve(A, X.T @ target)
    assert kept_w2.shape == (16, 16)
    assert torch.allclose(w3.double(), sol[:-1].T, atol=1e-4, rtol=1e-4)
    assert torch.allclose(b3.double(), sol[-1], atol=1e-4, rtol=1e-4)


def test_one_batch_is_not_enough_to_refit_and_the_history_says_so():
    torch.manual_seed(0)
    model = MLP().eval()
    data = _correlated(n_batches=1)
    out = _compile(model, data, "prune(ratio=0.5,importance=activation,reconstruct=true)")
    sliced = _compile(model, data, "prune(ratio=0.5,importance=activation)")
    info = _prune_record(out).info
    assert info["reconstructed"] == {}
    assert "none held back" in info["not_reconstructed"]["fc3"]
    x = torch.randn(5, 16)
    assert torch.equal(out(x), sliced(x))


def test_a_refit_that_overfits_is_declined_on_held_back_batches():
    """Four rows per batch against 16 kept columns: the fit interpolates its rows and does worse than
    slicing on the held-back batch, so the layer is only sliced."""
    torch.manual_seed(0)
    model = MLP().eval()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 16, generator=g) * 3 for _ in range(4)]
    out = _compile(model, data, "prune(ratio=0.5,importance=activation,reconstruct=true)")
    info = _prune_record(out).info
    assert "fc3" in info["not_reconstructed"] and "did worse" in info["not_reconstructed"]["fc3"]


def test_activation_importance_drops_the_channels_the_data_never_lights():
    """Half of fc1's channels are dead on the data (ReLU of a large negative bias) with the largest weights:
    ``l1`` keeps them, ``activation`` removes exactly them, and the output does not move."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[::2] *= 10          # big rows...
        model.fc1.bias[::2] = -1e4           # ...never active
    data = [torch.randn(32, 16) for _ in range(4)]
    x = torch.randn(8, 16)
    act = _compile(model, data, "prune(ratio=0.5,importance=activation,ignore=[fc2])")   # fc1's channels only
    l1 = _compile(model, data, "prune(ratio=0.5,ignore=[fc2])")
    assert _prune_record(act).info["channels"] == {"fc1": "32->16"}
    assert torch.allclose(act(x), model(x), atol=1e-5)
    assert not torch.allclose(l1(x), model(x), atol=1e-3)


def test_padding_rows_are_left_out_of_the_statistics():
    st = ReaderStats(want_gram=True)
    x = torch.randn(2, 5, 3)
    x[1, 3:] = 1e6                                   # padding positions with huge values
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    st.add(x, conv=False, mask=mask)
    assert st.count == 8
    assert torch.allclose(st.mean_square(), x[mask].double().pow(2).mean(0))
    assert st.gram[-1, -1] == 8


def test_a_shared_reader_is_sliced_not_refitted():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.head(self.fc2(h) + self.fc2(h * 0.5))
    torch.manual_seed(0)
    model = Shared().eval()
    data = _correlated()
    out = _compile(model, data, "prune(ratio=0.5,importance=activation,reconstruct=true)")
    info = _prune_record(out).info
    assert "fc2" not in info.get("reconstructed", {})
    assert out(torch.randn(3, 16)).shape == (3, 4)


def test_unknown_importance_names_the_choices():
    with pytest.raises(RecipeError, match="activation"):
        fxopt.compile(MLP().eval(), (torch.randn(2, 16),), recipe="prune(importance=energy)")


def test_measuring_a_train_mode_model_moves_no_batch_norm_statistics():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
    torch.manual_seed(0)
    model = Net().train()
    data = [torch.randn(4, 3, 6, 6) * 5 + 3 for _ in range(4)]
    out = fxopt.compile(model, (data[0],), recipe="prune(ratio=0.5,importance=activation,reconstruct=true)",
                        calibration=data, progress=False)
    stats = {k: v for k, v in out.state_dict().items() if "running" in k}
    assert stats, "the pruned model keeps its batch norm"
    # the 4 kept channels' statistics are the original's (untouched: mean 0, var 1)
    for k, v in stats.items():
        assert torch.equal(v, torch.zeros_like(v)) if "mean" in k else torch.equal(v, torch.ones_like(v))


def test_a_reader_that_also_produces_the_channels_is_refitted_on_both_sides():
    """``h = h + fc(relu(h))``: fc reads and writes the residual channels; its re-fit loses the same rows
    the pruning removes (this raised, and the pass was rolled back, before)."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.fc, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            h = self.inp(x)
            return self.head(h + self.fc(torch.relu(h)))
    torch.manual_seed(0)
    model = Residual().eval()
    data = _correlated()
    out = fxopt.compile(model, (data[0],), recipe="prune(ratio=0.5,importance=activation,reconstruct=true)",
                        calibration=data, progress=False, strict=True)
    rec = _prune_record(out)
    assert rec.status == "changed" and rec.info["channels"] == {"inp+fc": "32->16"}
    assert set(rec.info["reconstructed"]) == {"fc", "head"}
    assert out(torch.randn(3, 16)).shape == (3, 4)

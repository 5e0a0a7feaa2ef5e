"""The recovery APIs (recover=, qat, transfer, finetune) misused as a new user would: a silently wrong result
or a raw torch error is a bug; each case here gave one before it was fixed."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import InputError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _data(n=4, image=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (16, 1, 8, 8) if image else (16, 16)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_recover_keeps_a_prune_that_ran_over_one_that_was_rolled_back():
    """A batch of another structure fails the data-aware prune (rolled back): the unpruned copy is "closest to
    the original" but is not what the recipe asked for."""
    m, d = _cnn(), _data(image=True)
    x = d[0][0]
    with pytest.warns(UserWarning):
        out = fxopt.compile(m, (x,), recipe="prune-50", recover={"data": [d[0], d[1][0], d[2]], "epochs": 1},
                            progress=False)
    assert _params(out) < 0.6 * _params(m)
    stage = next(s for s in out.fxopt_history.stages if s["stage"] == "compress")
    assert stage["pruning"]["chosen"] == "weights (l1)" and stage["pruning"]["rolled_back"] == ["activation + reconstruct"]


def test_recover_errors_come_before_the_work_and_say_what_to_do():
    m, d = _cnn(), _data(image=True)
    x = d[0][0]
    with pytest.raises(InputError, match="'epoch'"):   # a typo, found before anything compiles
        fxopt.compile(m, (x,), recipe="prune-50,int8", recover={"data": d, "epoch": 1}, progress=False)
    with pytest.raises(InputError, match="qat_epochs"):
        fxopt.compile(m, (x,), recipe="prune-50,int8", recover={"data": d, "qat_epochs": 0}, progress=False)
    with pytest.raises(InputError, match="allocation"):
        fxopt.compile(m, (x,), recipe="prune-50", recover={"data": d, "allocation": "even"}, progress=False)
    with pytest.raises(InputError, match="dtypes"):
        fxopt.compile(m, (x,), recipe="prune-50,int8", recover={"data": [(x.long(), d[0][1])]}, progress=False)


def test_recover_without_qat_calibrates_a_static_int8_recipe_on_the_recovery_data():
    m, d = _cnn(), _data(image=True)
    out = fxopt.compile(m, (d[0][0],), recipe="prune-50,int8", recover={"data": d, "epochs": 1, "qat": False},
                        progress=False)
    assert [s["stage"] for s in out.fxopt_history.stages] == ["compress", "distill", "quantize"]
    with torch.no_grad():
        assert torch.isfinite(out(d[0][0])).all()


def test_qat_keeps_what_the_user_froze_and_refuses_one_shot_iterators():
    m, d = _mlp(), _data()
    x = d[0][0]
    for p in m[0].parameters():
        p.requires_grad_(False)
    ptq = fxopt.compile(m, (x,), recipe="int8-weight", progress=False)
    out = fxopt.qat(m, (x,), d, recipe="int8-weight", epochs=1, lr=0.5, progress=False)
    codes = {n: t for n, t in out.named_buffers() if n.endswith("_q")}
    ref = dict(ptq.named_buffers())
    first = [n for n in codes if n.startswith("0")]
    assert first and all(torch.equal(codes[n], ref[n]) for n in first)       # the frozen layer's codes stay
    assert any(not torch.equal(codes[n], ref[n]) for n in codes if n not in first)   # the other one trained
    with pytest.raises(InputError, match="one-shot"):
        fxopt.qat(m, (x,), iter(d), recipe="int8-weight", epochs=1, progress=False)


def test_transfer_freezes_the_backbone_batch_norms_and_checks_its_options():
    m, d = _cnn(), _data(image=True)
    before = {n: b.clone() for n, b in m.named_buffers()}
    out, h = fxopt.transfer(m, d, num_outputs=4, epochs=1, progress=False)
    assert all(torch.equal(b, before[n]) for n, b in out.named_buffers() if "running" in n)
    assert out[1].momentum == m[1].momentum
    # unfrozen after the first epoch: the statistics follow the new data again
    out2, _ = fxopt.transfer(m, d, num_outputs=4, epochs=2, unfreeze_after=1, progress=False)
    assert not torch.equal(out2[1].running_mean, before["1.running_mean"])
    # a compiled graph: its inference batch norms stay inference batch norms while the backbone is frozen
    gm = fxopt.compile(m, (d[0][0],), recipe="canonicalize", progress=False)
    out3, _ = fxopt.transfer(gm, d, num_outputs=4, epochs=1, progress=False)
    assert all(torch.equal(b, before[n]) for n, b in out3.named_buffers() if "running" in n and n in before)
    with pytest.raises(InputError, match="unfreeze_after"):
        fxopt.transfer(m, d, num_outputs=4, epochs=2, unfreeze_after=-1, progress=False)
    with pytest.raises(InputError, match="one-shot"):
        fxopt.transfer(m, iter(d), num_outputs=4, epochs=1, progress=False)


def test_finetune_rejects_learning_rates_eval_data_and_models_it_cannot_train():
    m, d = _mlp(), _data()
    for lr in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="lr must be"):
            fxopt.finetune(m, d, lr=lr, progress=False)
    with pytest.raises(InputError, match="eval_data is a one-shot"):
        fxopt.finetune(m, d, epochs=2, eval_data=iter(d[:2]), progress=False)
    with pytest.raises(InputError, match="eval_data is empty"):
        fxopt.finetune(m, d, eval_data=[], progress=False)
    with pytest.raises(InputError, match="labels beyond"):
        fxopt.finetune(m, d, eval_data=[(d[0][0], d[0][1] + 10)], progress=False)
    with pytest.raises(InputError, match="NaN"):
        fxopt.finetune(m, d, eval_data=[(torch.full((2, 16), float("nan")), torch.zeros(2, dtype=torch.long))],
                       progress=False)
    def sqrt_at_zero(out, target):   # a finite loss whose gradient is NaN (sqrt's slope at 0)
        return nn.functional.cross_entropy(out, target) + 0 * torch.sqrt(out.abs().min() * 0)
    with pytest.raises(InputError, match="became NaN/Inf at epoch 1"):
        fxopt.finetune(m, d[:1], loss=sqrt_at_zero, progress=False)
    lowered = fxopt.compile(m, (d[0][0],), recipe="int8-weight", progress=False)
    if any(n.op == "call_function" and "fxopt" in str(n.target) for n in lowered.graph.nodes):
        with pytest.raises(InputError, match="fxopt.qat"):
            fxopt.finetune(lowered, d, progress=False)


def test_the_data_aware_prune_allocates_by_sensitivity_unless_told_uniform():
    from fxopt.api import resolve_recipe
    from fxopt.train.recover import _data_aware
    for allocation in ("sensitivity", "uniform"):
        aware, changed = _data_aware(resolve_recipe("prune-50"), allocation)
        cfg = next(s.config for s in aware.steps if getattr(s, "name", "") == "prune")
        assert changed and (cfg.importance, cfg.reconstruct, cfg.allocation) == ("activation", True, allocation)
    aware, _ = _data_aware(resolve_recipe("prune(ratio=0.5,scope=global)"), "sensitivity")
    assert next(s.config for s in aware.steps if getattr(s, "name", "") == "prune").allocation == "uniform"



def test_the_recovery_call_passes_the_users_allocation_to_its_data_aware_prune(monkeypatch):
    import fxopt.train.recover as R
    seen = []
    real = R._data_aware

    def spy(pipeline, *a):
        seen.append(a)
        return real(pipeline, *a)
    monkeypatch.setattr(R, "_data_aware", spy)
    m, d = _cnn(), _data(image=True)
    for allocation in ("uniform", "sensitivity"):
        fxopt.compile(m, (d[0][0],), recipe="prune-50", recover={"data": d, "epochs": 1, "allocation": allocation},
                      progress=False)
    assert seen == [("uniform",), ("sensitivity",)]

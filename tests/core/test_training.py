"""fxopt.finetune on plain and compiled modules, with the digits data the benchmarks use."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import DemoNet
from models import state_hash


def test_sgd_with_cosine_learns_digits_and_is_deterministic(digits):
    train, test = digits
    torch.manual_seed(0)
    model = DemoNet()
    before = state_hash(model)
    a, ha = fxopt.finetune(model, train, epochs=4, lr=0.05, momentum=0.9, schedule="cosine", eval_data=test,
                           seed=1, progress=False)
    b, hb = fxopt.finetune(model, train, epochs=4, lr=0.05, momentum=0.9, schedule="cosine", eval_data=test,
                           seed=1, progress=False)
    assert state_hash(model) == before  # the model passed in is untouched
    assert ha.epochs[-1]["eval_accuracy"] > 80
    assert [e["loss"] for e in ha.epochs] == [e["loss"] for e in hb.epochs]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha.epochs[-1]["lr"] < 0.01 and "eval_accuracy" in ha.table()


def test_finetune_a_compiled_model(digits):
    from fxopt.train.training import _evaluate
    train, test = digits
    torch.manual_seed(0)
    trained, _ = fxopt.finetune(DemoNet(), train, epochs=4, lr=0.05, progress=False)
    compiled = fxopt.compile(trained, (train[0][0],))  # batch norm folded into the convs
    loss0, acc0 = _evaluate(compiled, test, nn.functional.cross_entropy)
    assert abs(acc0 - _evaluate(trained, test, nn.functional.cross_entropy)[1]) < 0.5
    tuned, hist = fxopt.finetune(compiled, train, epochs=2, lr=0.01, eval_data=test, progress=False)
    assert isinstance(tuned, torch.fx.GraphModule)
    assert hist.epochs[-1]["eval_loss"] < loss0
    assert tuned(train[0][0][:3]).shape == (3, 10)


@pytest.mark.parametrize("opt,sched,amp", [("adam", "step", None), ("adamw", "linear", "bf16"),
                                           ("sgd", "onecycle", None), ("sgd", "constant", "bf16")])
def test_optimizers_schedules_and_amp(digits, opt, sched, amp):
    train, _ = digits
    _, hist = fxopt.finetune(DemoNet(), train[:6], epochs=2, optimizer=opt, schedule=sched, amp=amp,
                             lr=0.01, warmup_steps=2, progress=False)
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"] * 1.5 and hist.steps == 12


def test_schedules_shape():
    from fxopt.train.training import make_schedule
    cos = make_schedule("cosine", 100, 10, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0)
    step = make_schedule("step", 100, 10, step_size=2, gamma=0.5)
    assert step(0) == 1.0 and step(25) == 0.5 and step(45) == 0.25


def test_cubic_sparsity_schedule():
    s = [fxopt.cubic_sparsity(t, 0.8, 10, 110) for t in range(0, 130, 10)]
    assert s[0] == 0 and s[1] == 0 and s[-1] == pytest.approx(0.8) and s == sorted(s)
    assert s[2] - s[1] > s[-2] - s[-3]  # prunes fast first, slowly at the end


@pytest.mark.parametrize("kwargs,match", [
    ({"optimizer": "lbfgs"}, "unknown optimizer"),
    ({"schedule": "warp"}, "unknown schedule"),
    ({"loss": "hinge"}, "unknown loss"),
    ({"amp": "fp8"}, "amp must be"),
    ({"amp": "fp16"}, "CUDA"),
    ({"lr": 1e6, "momentum": 0.0}, "loss became"),
])
def test_bad_settings_are_clear_errors(digits, kwargs, match):
    train, _ = digits
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.finetune(DemoNet(), train[:3], epochs=2, progress=False, **kwargs)


def test_bad_data_is_a_clear_error():
    with pytest.raises(fxopt.InputError, match="empty"):
        fxopt.finetune(nn.Linear(2, 2), [], progress=False)
    with pytest.raises(fxopt.InputError, match="one-shot iterator"):
        fxopt.finetune(nn.Linear(2, 2), iter([(torch.randn(2, 2), torch.tensor([0, 1]))]), epochs=2,
                       progress=False)
    with pytest.raises(fxopt.InputError, match="pairs"):
        fxopt.finetune(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)


def test_compiled_batch_norm_trains_then_freezes_again():
    from models import ResCNN
    torch.manual_seed(0)
    model = ResCNN().eval()
    x, y = torch.randn(16, 3, 8, 8) * 3 + 1, torch.randint(0, 10, (16,))
    gm = fxopt.compile(model, (x[:2],), recipe="cleanup")   # batch norm kept (not folded)
    frozen = torch.ops.aten._native_batch_norm_legit_no_training.default
    assert sum(n.target is frozen for n in gm.graph.nodes) == 2
    tuned, _ = fxopt.finetune(gm, [(x, y)] * 2, epochs=1, lr=0.0, momentum=0.0, progress=False)
    stats = {k: v for k, v in tuned.state_dict().items() if "running_mean" in k}
    assert stats and all(not torch.allclose(v, torch.zeros_like(v)) for v in stats.values())  # re-estimated
    assert sum(n.target is frozen for n in tuned.graph.nodes) == 2                            # frozen again
    same, _ = fxopt.finetune(gm, [(x, y)] * 2, epochs=1, lr=0.0, momentum=0.0, train_bn=False, progress=False)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in same.state_dict().items() if "running" in k)


def test_gradual_structured_pruning_shrinks_step_by_step(digits):
    from fxopt.models import DemoNet
    from fxopt.train.training import _evaluate
    train, test = digits
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=4, lr=0.05, progress=False)
    pruned, hist = fxopt.gradual_prune(dense, train, final_sparsity=0.5, epochs=4, structured=True,
                                       optimizer="sgd", lr=0.05, momentum=0.9, progress=False, seed=0)
    params = [e["params"] for e in hist.epochs]
    # epoch 1 trains the dense model (the cubic schedule starts at 0), then each epoch removes more
    assert params[0] == sum(p.numel() for p in dense.parameters())
    assert params[0] > params[1] > params[2] >= params[3] and params[-1] < 0.35 * params[0]
    assert [e["pruned"] for e in hist.epochs][-1] == 0.5
    assert _evaluate(pruned, test, torch.nn.functional.cross_entropy)[1] > 90
    assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)

import warnings

import pytest
import torch

import fxopt
from models import MLP, DictOut, Redundant, ResCNN, state_hash


@pytest.mark.parametrize("make,x", [(ResCNN, torch.randn(2, 3, 8, 8)), (Redundant, torch.randn(8, 8)),
                                    (MLP, torch.randn(3, 16))])
def test_compile_never_mutates_the_model(make, x):
    model = make().train()  # train mode: compile must not flip it either
    before = state_hash(model)
    ids_before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    out = fxopt.compile(model, (x,))
    assert state_hash(model) == before
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == ids_before
    # and the result shares no tensor with it
    shared = {id(t) for t in model.state_dict(keep_vars=True).values()} & \
        {id(t) for t in out.state_dict(keep_vars=True).values()}
    assert not shared


def test_compile_matches_eval_outputs_and_attaches_history():
    model = Redundant().eval()
    x = torch.randn(8, 8)
    out = fxopt.compile(model, (x,))
    assert torch.allclose(out(x), model(x), atol=1e-6)
    h = out.fxopt_history
    assert h.pipeline == fxopt.recipes["default"].pipeline and h.records and not h.failures
    assert len(h.final) < len(h.initial)
    assert "cleanup > repeat#1 > remove-noops" in h.table() and "fold-bn" in h.table()


def test_structured_outputs_survive_compile():
    model = DictOut().eval()
    kw = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    out = fxopt.compile(model, kwargs=kw)
    res, ref = out(**kw), model(**kw)
    assert res.keys() == ref.keys() and torch.equal(res["pooled"][0], ref["pooled"][0])


def test_recipe_forms():
    model, x = MLP().eval(), torch.randn(2, 16)
    for recipe in ("default", "cleanup", "dce,cse", ["dce", fxopt.get_pass("cse")()],
                   fxopt.Pipeline(["dce"])):
        out = fxopt.compile(model, (x,), recipe=recipe)
        assert torch.allclose(out(x), model(x))


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(fxopt.RecipeError) as info:
        fxopt.compile(MLP(), (torch.randn(2, 16),), recipe="turbo")
    assert "default" in str(info.value) and "cleanup" in str(info.value)


def test_recipes_registry():
    assert "default" in fxopt.recipes and "nope" not in fxopt.recipes
    assert fxopt.recipes["default"].doc
    assert "default" in repr(fxopt.recipes)
    with pytest.raises(fxopt.RecipeError):
        fxopt.register_recipe("default", "dce", "again")


@pytest.mark.parametrize("args,kwargs,match", [
    ((), None, "needs example inputs"),
    ((torch.tensor([[float("nan")] * 16]),), None, "NaN"),
    ((torch.randn(2, 5),), None, "does not run"),
])
def test_bad_inputs_are_input_errors(args, kwargs, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.compile(MLP(), args, kwargs)


def test_model_producing_nan_is_rejected():
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    # a positive input meets the inf: relu keeps it and the output is not finite (a negative one would be
    # zeroed by relu, so the input is fixed rather than random)
    with pytest.raises(fxopt.InputError, match="NaN or Inf"):
        fxopt.compile(model, (torch.ones(2, 16),))


def test_strict_compile_raises_on_a_bad_pass():
    @fxopt.graph_pass("t-api-scale")
    def scale(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        with gm.graph.inserting_before(out):
            m = gm.graph.call_function(torch.ops.aten.mul.Tensor, (src, 2.0))
        src.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m)
        return True

    model, x = MLP().eval(), torch.randn(2, 16)
    with pytest.warns(UserWarning, match="t-api-scale"):
        out = fxopt.compile(model, (x,), recipe="t-api-scale")
    assert torch.allclose(out(x), model(x))
    with pytest.raises(fxopt.PassError, match="t-api-scale"):
        fxopt.compile(model, (x,), recipe="t-api-scale", strict=True)


def test_compile_minilm_with_keyword_inputs(minilm):
    model, kw = minilm
    before = state_hash(model)
    out = fxopt.compile(model, kwargs=kw)
    with torch.no_grad():
        res, ref = out(**kw), model(**kw)
    assert type(res) is type(ref)
    assert (res.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    assert (res.pooler_output - ref.pooler_output).abs().max() <= 1e-5
    assert state_hash(model) == before
    assert not out.fxopt_history.failures


def test_progress_bar_is_shown_on_request(capsys):
    fxopt.compile(MLP().eval(), (torch.randn(2, 16),), progress=True)
    err = capsys.readouterr().err
    assert "fxopt" in err and "pass" in err
    fxopt.compile(MLP().eval(), (torch.randn(2, 16),), progress=False)
    assert capsys.readouterr().err == ""


def test_unknown_option_warns_with_what_the_passes_read():
    model, x = MLP(), torch.randn(2, 16)
    with pytest.warns(UserWarning, match="smoothqaunt are not read.*smoothquant"):
        fxopt.compile(model, (x,), recipe="int8-dynamic", smoothqaunt=0.5)
    with pytest.warns(UserWarning, match="group_size.*reads no options"):
        fxopt.compile(model, (x,), recipe="default", group_size=64)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxopt.compile(model, (x,), recipe="int4-weight", group_size=4)


# --- bad calibration data, options and recipes that change nothing ----------------------------
class _LoaderBroke(Exception):
    pass


def _broken_loader():
    yield torch.randn(4, 16)
    raise _LoaderBroke("disk went away")


@pytest.mark.parametrize("strict", [False, True])
def test_bad_calibration_data_raises_strict_or_not(strict):
    with pytest.raises(fxopt.CalibrationError, match="empty"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int8", calibration=[], strict=strict)
    bad = [torch.full((4, 16), float("nan"))]
    with pytest.raises(fxopt.CalibrationError, match="NaN"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int8", calibration=bad, strict=strict)
    with pytest.raises(fxopt.CalibrationError, match="needs calibration data"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int8", strict=strict)


def test_the_users_own_loader_error_reaches_the_user():
    with pytest.raises(_LoaderBroke, match="disk went away"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int8", calibration=_broken_loader())


def test_a_user_metric_that_raises_reaches_the_user():
    def metric(m):
        raise _LoaderBroke("my metric failed")
    with pytest.raises(_LoaderBroke, match="my metric"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="insert-qdq(activation=int8/token),lower-quant",
                      budget_metric=metric, max_metric_drop=0.01)


def test_a_generator_of_calibration_batches_is_read_once_and_works():
    batches = (torch.randn(4, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int8", calibration=batches)
    assert any(n.target is torch.ops.fxopt.linear_int8.default for n in q.graph.nodes)


@pytest.mark.parametrize("value", [0, -1, 1, 2.5, True, "64"])
def test_bad_group_size_is_a_recipe_error_before_any_work(value, monkeypatch):
    import fxopt.api
    monkeypatch.setattr(fxopt.api, "trace", lambda *a, **k: pytest.fail("captured before checking options"))
    with pytest.raises(fxopt.RecipeError, match="group_size must be an integer >= 2"):
        fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int4-weight", group_size=value)


def test_a_recipe_that_changes_nothing_says_so():
    with pytest.warns(UserWarning, match=r"changed nothing in insert-qdq \(input size not a multiple of group size 7"):
        q = fxopt.compile(MLP(), (torch.randn(4, 16),), recipe="int4-weight", group_size=7)
    assert not any(n.target is torch.ops.fxopt.linear_wq.default for n in q.graph.nodes)
    conv_only = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.warns(UserWarning, match="changed nothing in insert-qdq"):
        fxopt.compile(conv_only, (torch.randn(2, 3),), recipe="int8-dynamic")

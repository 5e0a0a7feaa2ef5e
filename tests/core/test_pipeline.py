import dataclasses

import pytest
import torch

import fxopt
from fxopt.passmgr.pipeline import Pipeline, Repeat, format_value, parse_pipeline


@fxopt.graph_pass("test-opts", register=True)
def _opts_pass(gm, ctx, dtype: str = "fp32", ratio: float = 0.5, layers: tuple = (), keep: bool = False,
               note: str = "x"):
    """A pass with options, for parser tests."""
    return False


@pytest.mark.parametrize("text", [
    "cleanup",
    "dce,cse",
    "cleanup,test-opts(dtype=bf16)",
    "repeat(cse,dce)",
    "repeat(cse,dce,max=3),remove-noops",
    "test-opts(dtype=fp16,ratio=0.25,layers=[fc1,head.0,'a b','1'],keep=true)",
    "test-opts(note='a b,c')",
    "test-opts(note='none')",
    "repeat(repeat(dce),cse)",
])
def test_canonical_strings_round_trip(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert parse_pipeline(str(p)) == p


def test_defaults_are_omitted_and_whitespace_ignored():
    assert str(parse_pipeline(" test-opts( dtype = fp32 , ratio=0.5 ) , dce ")) == "test-opts,dce"


def test_values_are_typed():
    (step,) = parse_pipeline("test-opts(ratio=1e-3,layers=[1,2],keep=false,note=none)").steps
    assert step.config.ratio == 1e-3 and step.config.layers == (1, 2)
    assert step.config.keep is False and step.config.note is None
    assert format_value("none") == "'none'" and format_value(None) == "none"


def test_unknown_pass_suggests_close_names():
    with pytest.raises(fxopt.PipelineError, match="Did you mean cse"):
        parse_pipeline("cleanup,csee")


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(fxopt.PipelineError, match="ratio"):
        parse_pipeline("test-opts(ration=0.1)")


@pytest.mark.parametrize("text,column", [("dce,,cse", 5), ("dce(", 5), ("dce cse", 5), ("repeat(dce,max=0)", None)])
def test_syntax_errors_point_at_the_column(text, column):
    with pytest.raises(fxopt.PipelineError) as info:
        parse_pipeline(text)
    if column:
        assert f"column {column}" in str(info.value)


def test_repeat_and_pipeline_objects():
    r = Repeat("cse,dce", max=2)
    assert str(r) == "repeat(cse,dce,max=2)"
    assert str(Pipeline(["cleanup", r])) == "cleanup,repeat(cse,dce,max=2)"
    assert str(parse_pipeline("dce") + "cse") == "dce,cse"


def test_graph_pass_builds_a_frozen_config():
    cls = fxopt.get_pass("test-opts")
    assert dataclasses.is_dataclass(cls.Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().config.dtype = "x"
    assert cls.doc() == "A pass with options, for parser tests."


def test_register_pass_validates_name_and_config():
    class Bad(fxopt.Pass):
        name = "Not_Kebab"
    with pytest.raises(fxopt.PipelineError, match="kebab"):
        fxopt.register_pass(Bad)

    @dataclasses.dataclass
    class Mutable:
        x: int = 1

    class Bad2(fxopt.Pass):
        name = "bad-config"
        Config = Mutable
    with pytest.raises(fxopt.PipelineError, match="frozen"):
        fxopt.register_pass(Bad2)


def test_empty_pipeline_is_an_error():
    with pytest.raises(fxopt.PipelineError, match="empty"):
        parse_pipeline("  ")


@pytest.mark.parametrize("text, message", [
    ("magnitude-prune(ratio=abc)", "option ratio='abc' must be a float"),
    ("magnitude-prune(rato=0.3)", "unknown option rato; its options are ratio"),
    ("insert-qdq(budget=high)", "option budget='high' must be a float"),
    ("cleanup,magnitude-prune(keep_output=3)", "option keep_output=3 must be a bool"),
])
def test_a_bad_option_value_names_the_option_not_an_unknown_recipe(text, message):
    with pytest.raises(fxopt.RecipeError) as e:
        fxopt.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), recipe=text)
    assert message in str(e.value) and "unknown recipe" not in str(e.value)


class _Net(torch.nn.Module):
    """Conv + batch norm (prune, fold-bn), a norm feeding linears (smooth-quant), a group-wise-sized linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 256), torch.nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(self.norm(h))))


# every recipe, and the compile options that change what its passes do
_RUNS = [(name, {}) for name in ("default", "cleanup", "bf16", "fp16", "int4-weight", "int8", "int8-dynamic",
                                 "int8-weight", "prune-50", "sparse-2:4")] + [
    ("int4-weight", {"group_size": 32}), ("int8-dynamic", {"smoothquant": 0.3}),
    ("int8-dynamic", {"smoothquant": False}), ("int8", {"smoothquant": 0.5}), ("int8-weight", {"group_size": 64})]


@pytest.mark.parametrize("recipe, options", _RUNS, ids=[f"{r}-{o}" for r, o in _RUNS])
def test_the_printed_pipeline_reproduces_the_run_bit_for_bit(recipe, options):
    import warnings
    import fxopt
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(4, 3, 8, 8)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (int8-weight's group_size reaches no group-wise spec: a warning)
        first = fxopt.compile(model, (x,), recipe=recipe, calibration=calib, **options)
        pipeline = first.fxopt_history.pipeline
        again = fxopt.compile(model, (x,), recipe=pipeline, calibration=calib)  # the options are in the text now
    assert not first.fxopt_history.failures and not again.fxopt_history.failures
    assert again.fxopt_history.pipeline == pipeline
    for probe in (x, torch.randn(2, 3, 8, 8)):
        assert torch.equal(first(probe), again(probe)), (recipe, options, pipeline)
    if options.get("group_size") == 32:
        assert "group32" in pipeline and "group128" not in pipeline
    if "smoothquant" in options:
        assert ("smooth-quant(alpha=" in pipeline) == bool(options["smoothquant"])


def test_aliases_are_data_not_passes():
    from fxopt.passmgr.pipeline import PipelineAlias, get_pipeline, register_pipeline
    step = parse_pipeline("cleanup").steps[0]
    assert isinstance(step, PipelineAlias) and not isinstance(step, fxopt.Pass)
    assert not hasattr(step, "tolerance") and not hasattr(step, "preserves_semantics")
    assert step == get_pipeline("cleanup") and str(step) == "cleanup"
    assert get_pipeline("int8-dynamic").from_recipe and "cleanup" not in fxopt.list_passes()
    with pytest.raises(fxopt.PipelineError, match="takes no options"):
        parse_pipeline("cleanup(max=2)")
    with pytest.raises(fxopt.PipelineError, match="is a pass"):
        register_pipeline("cse", "dce", "shadowing a pass")
    with pytest.raises(fxopt.PipelineError, match="pipeline alias"):
        fxopt.get_pass("cleanup")

    class Shadow(fxopt.Pass):
        name = "cleanup"
    with pytest.raises(fxopt.PipelineError, match="pipeline alias"):
        fxopt.register_pass(Shadow)
    assert get_pipeline("cleanup") is step

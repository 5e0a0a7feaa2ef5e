"""The lowering rule table (passes/lower/rules.py) and the typed quantization annotations lowering reads."""
from __future__ import annotations

import dataclasses
import doctest
from typing import Optional

import pytest
import torch
from torch import nn

import fxopt
import fxopt.passes.lower.lower_quant as lower_quant
from fxopt.ir.dialect import CUSTOM_META, QUANT_ANNOTATION_META, QUANT_META
from fxopt.passes.lower import rules
from fxopt.quant.annotation import QuantAnnotation
from fxopt.quant.qspec import QSpec, dequantize
from models import MLP

fxq = torch.ops.fxopt


@torch.library.custom_op("fxopt_toy::linear_wq", mutates_args=())
def toy_linear_wq(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    return nn.functional.linear(x, dequantize(w_q, w_scale, w_zp), bias)


@toy_linear_wq.register_fake
def _(x, w_q, w_scale, w_zp, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _build_toy(m: rules.QuantMatch, rule: rules.LoweringRule) -> str:
    g = m.gm.graph
    with g.inserting_before(m.node):
        new = g.call_function(rule.kernel, (m.x, m.w.q, m.w.scale, m.w.zp, m.bias))
    m.node.replace_all_uses_with(new)
    g.erase_node(m.node)
    return rule.name


def _toy_rule(devices: tuple) -> rules.LoweringRule:
    return rules.LoweringRule("toy_linear", "quant", torch.ops.aten.linear.default, devices,
                              torch.ops.fxopt_toy.linear_wq.default, "linear(x, dq(W8), b)", rules.match_quant,
                              _build_toy, lambda m: m.act is None and m.ann.group_size == 0)


def _simulated(recipe: str, seed: int = 0):
    torch.manual_seed(seed)
    model, x = MLP(128, 128, 16).eval(), torch.randn(8, 128)
    sim = fxopt.compile(model, (x,), recipe=recipe, calibration=[torch.randn(8, 128) for _ in range(2)],
                        disable=["lower-quant", "fold-constants"])
    return sim, x


def _lower(gm, x, pipeline: str = "lower-quant(engine=fbgemm)"):
    res = fxopt.PassManager(pipeline, strict=True).run(gm, (x,))
    return res.history.records[0]


def _layers(gm):
    return [n for n in gm.graph.nodes if n.meta.get(QUANT_META)]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------- the table
@pytest.mark.parametrize("module", [rules, fxopt.quant.annotation])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_every_rule_is_in_the_docs():
    assert rules.table() in rules.__doc__, "update the table in passes/lower/rules.py's docstring:\n" + rules.table()
    assert rules.table("quant") in lower_quant.__doc__
    for r in rules.LOWERING_RULES:
        assert r.name in rules.__doc__ and r.pattern in rules.__doc__ and r.kernel_name in rules.__doc__


def test_register_lowering_checks_names_and_positions(monkeypatch):
    monkeypatch.setattr(rules, "LOWERING_RULES", list(rules.LOWERING_RULES))
    with pytest.raises(ValueError, match="exists"):
        rules.register_lowering(dataclasses.replace(_toy_rule(("cpu",)), name="linear_wq"))
    with pytest.raises(ValueError, match="no such rule"):
        rules.register_lowering(_toy_rule(("cpu",)), before="linear_int3")
    with pytest.raises(ValueError, match="device"):
        _toy_rule(())
    rules.register_lowering(_toy_rule("toy"), before="linear_wq")
    assert [r.name for r in rules.rules_for("quant", "cpu", torch.ops.aten.linear.default)] == [
        "linear_int8", "linear_int8_dynamic", "linear_wq"]
    assert [r.name for r in rules.rules_for("quant", "toy")] == ["toy_linear"]


def test_graph_device_reads_parameters_then_inputs():
    assert rules.graph_device(fxopt.trace(nn.Linear(2, 3), (torch.randn(1, 2),))) == "cpu"
    assert rules.graph_device(torch.fx.symbolic_trace(nn.Linear(2, 3, device="meta"))) == "meta"
    assert rules.graph_device(torch.fx.symbolic_trace(nn.ReLU()), (torch.randn(2, device="meta"),)) == "meta"


def test_a_rule_for_a_new_device_is_picked_without_editing_the_pass(monkeypatch):
    sim, x = _simulated("int8-weight")
    want = sim(x)
    monkeypatch.setattr(rules, "LOWERING_RULES", list(rules.LOWERING_RULES))
    monkeypatch.setattr(rules, "graph_device", lambda gm, args=(): "toy")
    names = [n.name for n in _layers(sim)]
    # no rule for the device: every layer stays simulated and the record says so
    rec = _lower(sim, x)
    assert rec.info == {"kept": names}
    rules.register_lowering(_toy_rule(("toy",)))
    rec = _lower(sim, x)
    assert rec.info["lowered"] == {"toy_linear": 2} and rec.info["kept"] == []
    t = _targets(sim)
    assert t.count(torch.ops.fxopt_toy.linear_wq.default) == 2 and fxq.linear_wq.default not in t
    torch.testing.assert_close(sim(x), want)


def test_a_user_rule_on_cpu_takes_priority_where_registered(monkeypatch):
    sim, x = _simulated("int8-weight")
    monkeypatch.setattr(rules, "LOWERING_RULES", list(rules.LOWERING_RULES))
    rules.register_lowering(_toy_rule(("cpu",)), before="linear_wq")
    want = sim(x)
    assert _lower(sim, x).info["lowered"] == {"toy_linear": 2}
    torch.testing.assert_close(sim(x), want)


# ---------------------------------------------------------------- typed annotations
def test_insert_qdq_writes_typed_annotations_and_their_text():
    sim, _ = _simulated("int8")
    for n in _layers(sim):
        ann = n.meta[QUANT_ANNOTATION_META]
        assert isinstance(ann, QuantAnnotation) and ann.weight.granularity == "channel" and ann.isa
        assert n.meta[QUANT_META] == ann.to_dict() == n.meta[CUSTOM_META][QUANT_META]
        assert ann.symmetric and not ann.weight_only and not ann.dynamic and ann.group_size == 0


@pytest.mark.parametrize("weight, activation, isa", [
    ("int8/channel", "uint8/tensor", "avx2"), ("int4/group64/asym/mse", None, None),
    ("int7/channel", "int8/token", "avx512-vnni (forced)"), ("uint8/channel/sym", "uint7/tensor/percentile", None)])
def test_annotation_text_round_trips(weight, activation, isa):
    ann = QuantAnnotation(QSpec.parse(weight), QSpec.parse(activation) if activation else None, isa)
    assert QuantAnnotation.from_dict(ann.to_dict()) == ann
    assert ann.to_dict()["weight"] == weight and ann.to_dict()["activation"] == activation


def test_annotation_errors_name_what_to_do():
    with pytest.raises(TypeError, match="QSpec"):
        QuantAnnotation("int8/channel")
    g = torch.fx.Graph()
    node = g.placeholder("fc1_linear")
    node.meta[QUANT_META] = {"weight": "int9/channel", "activation": None}
    with pytest.raises(ValueError, match="'fc1_linear'.*insert-qdq"):
        QuantAnnotation.of(node)


def test_lowering_reads_the_typed_annotation_not_the_text():
    sim, x = _simulated("int8")
    asym = {"weight": "int8/channel/asym", "activation": "uint8/tensor"}
    for n in _layers(sim):  # the text says asymmetric; the typed annotation (symmetric) is what counts
        n.meta[QUANT_META] = dict(asym)
        n.meta[CUSTOM_META] = {QUANT_META: dict(asym)}
    assert _lower(sim, x).info["lowered"] == {"linear_int8": 2}

    sim, x = _simulated("int8")
    for n in _layers(sim):  # asymmetric by the annotation, though every zero point happens to be 0
        ann = n.meta[QUANT_ANNOTATION_META]
        n.meta[QUANT_ANNOTATION_META] = dataclasses.replace(ann, weight=dataclasses.replace(ann.weight,
                                                                                            symmetric=False))
    rec = _lower(sim, x)
    assert rec.info == {"kept": [n.name for n in _layers(sim)]}


@pytest.mark.parametrize("keep, lowered", [((QUANT_META,), {"linear_int4_weight": 2}),  # text of an older graph
                                          ((CUSTOM_META,), {"linear_int4_weight": 2}),  # text of a loaded graph
                                          ((), {"linear_int8_weight": 2})])  # nothing: 8-bit codes assumed
def test_graphs_without_the_typed_annotation_still_lower(keep, lowered):
    sim, x = _simulated("int4-weight")
    want = sim(x)
    for n in _layers(sim):
        for k in {QUANT_ANNOTATION_META, QUANT_META, CUSTOM_META} - set(keep):
            del n.meta[k]
    rec = _lower(sim, x)
    assert rec.info["lowered"] == lowered and rec.info["kept"] == []
    torch.testing.assert_close(sim(x), want)


def test_annotations_survive_save_and_load(tmp_path):
    sim, x = _simulated("int4-weight")
    anns = [n.meta[QUANT_ANNOTATION_META] for n in _layers(sim)]
    fxopt.save(sim, tmp_path / "sim.fxopt")
    back = fxopt.load(tmp_path / "sim.fxopt")
    assert [QuantAnnotation.of(n) for n in back.graph.nodes if QuantAnnotation.of(n)] == anns
    want = back(x)
    assert _lower(back, x).info["lowered"] == {"linear_int4_weight": 2}  # packed, as the spec says
    torch.testing.assert_close(back(x), want)

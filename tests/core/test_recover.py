"""Recovering accuracy: distillation, QAT, transfer learning and compile(recover=...), on the digits data."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import InputError, RecipeError
from fxopt.models import DemoNet
from fxopt.train.training import _evaluate
from models import state_hash

CE = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def trained(digits):
    train, _ = digits
    torch.manual_seed(0)
    model, _ = fxopt.finetune(DemoNet(width=16), train, epochs=4, lr=0.05, progress=False)
    return model


def _acc(m, test):
    return _evaluate(m, test, CE)[1]


class Blocks(nn.Module):
    """An MLP whose hidden layers sit in a ModuleList (the blocks distillation pairs by default)."""

    def __init__(self, width=32, out=10):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
                                     for _ in range(2)])
        self.head = nn.Linear(width, out)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


# ---------------------------------------------------------------- distillation
def test_logit_distillation_defaults_to_the_uncompressed_model_and_changes_nothing_it_is_given(digits, trained):
    train, test = digits
    ref = _acc(trained.eval(), test)
    pruned = fxopt.compile(trained, (train[0][0],), recipe="prune-50")
    assert _acc(pruned, test) < ref - 10
    trained.train()  # the user's mode must survive too
    before = state_hash(trained)
    student, hist = fxopt.finetune(pruned, train, distill="logits", epochs=3, lr=0.05, nesterov=True, progress=False)
    assert trained.training and state_hash(trained) == before
    trained.eval()
    assert all("kd" in e for e in hist.epochs) and "kd" in hist.table()
    assert _acc(student, test) > ref - 3
    # the taps and projections are gone: the student is an ordinary graph of the same nodes
    assert [n.target for n in student.graph.nodes] == [n.target for n in pruned.graph.nodes]
    # deterministic
    again, h2 = fxopt.finetune(pruned, train, distill="logits", epochs=3, lr=0.05, nesterov=True, progress=False)
    assert [e["loss"] for e in hist.epochs] == [e["loss"] for e in h2.epochs]


def test_hidden_distillation_pairs_blocks_projects_pruned_widths_and_needs_no_labels(digits):
    train, test = digits
    torch.manual_seed(0)
    teacher, _ = fxopt.finetune(Blocks(), train, epochs=3, lr=0.05, progress=False)
    pruned = fxopt.compile(teacher, (train[0][0],), recipe="prune-50")
    unlabeled = [x for x, _ in train]
    from fxopt.train.distill import Distiller
    d = Distiller(pruned, teacher, "hidden")
    assert [s for s, _ in d.pairs] == ["blocks.0", "blocks.1", "<output>"]
    d.remove()
    _, h = fxopt.finetune(pruned, unlabeled, distill="hidden", epochs=3, lr=0.02, progress=False)
    assert h.epochs[-1]["hidden"] < 0.7 * h.epochs[0]["hidden"] and "accuracy" not in h.epochs[0]
    s1, h = fxopt.finetune(pruned, unlabeled, distill="both", epochs=3, lr=0.02, progress=False)
    assert {"kd", "hidden"} <= set(h.epochs[0])
    assert _acc(s1, test) > _acc(pruned, test) + 5  # no labels: the teacher's logits teach
    # a pruned width (the first linear of a block keeps half its outputs) is matched by a learned projection
    d = Distiller(pruned, teacher, "hidden", features={"blocks.0.0": "blocks.0.0"})
    x = train[0][0]
    t_out, t_feats = d.teacher_outputs(lambda m: m(x))
    value, parts = d.loss(pruned(x), t_out, t_feats)
    assert t_feats["blocks.0.0"].shape[-1] == 64 and d.s_taps.values["blocks.0.0"].shape[-1] == 32
    assert list(d.projections) == ["blocks__0__0"] and value > 0
    d.remove()
    s2, h2 = fxopt.finetune(pruned, unlabeled, distill="both", features={"blocks.0.0": "blocks.0.0"},
                            hidden_loss="mse+cosine", epochs=2, lr=0.02, progress=False)
    assert {"kd", "hidden"} <= set(h2.epochs[0])
    # plain (uncompiled) students distill through forward hooks
    plain, h3 = fxopt.finetune(Blocks(width=16), train, teacher=teacher, distill="both",
                               features={"blocks.1": "blocks.1"}, epochs=2, lr=0.05, progress=False)
    assert not plain.blocks[1]._forward_hooks and h3.epochs[-1]["loss"] < h3.epochs[0]["loss"]


class _Tokens(nn.Module):
    """A token encoder called like a Hugging Face one (``input_ids``, ``attention_mask``) returning hidden
    states ``[batch, seq, width]``; ``pad_noise`` writes arbitrary values at the padding positions."""

    def __init__(self, width=16, pad_noise=0.0):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.layer = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))])
        self.pad_noise = pad_noise

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        h = h + self.layer[0](h)
        pad = (1 - attention_mask).unsqueeze(-1).float()
        return h + self.pad_noise * pad * torch.sin(torch.arange(h.numel()).view(h.shape).float())


def test_hidden_distillation_compares_real_tokens_not_padding():
    """A Hugging Face batch's padding positions are read by nothing (attention masks them out, pooling skips
    them): what the teacher outputs there must not move the student, and its loss covers real tokens only."""
    torch.manual_seed(0)
    base = _Tokens()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        lengths = torch.randint(2, 9, (6,), generator=g)
        mask = (torch.arange(8) < lengths[:, None]).long()
        data.append({"input_ids": torch.randint(1, 50, (6, 8), generator=g) * mask, "attention_mask": mask})
    runs = []
    for noise in (0.0, 100.0):
        teacher = _Tokens(pad_noise=noise)
        teacher.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        student = _Tokens()
        out, h = fxopt.finetune(student, data, teacher=teacher, distill="hidden", hidden_loss="mse+cosine",
                                epochs=2, lr=0.01, seed=0, progress=False)
        runs.append((out.state_dict(), [e["loss"] for e in h.epochs]))
    (a, la), (b, lb) = runs
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)
    assert la[-1] < la[0]


def test_the_teacher_runs_once_per_batch_of_a_list_and_training_is_unchanged(digits):
    train, _ = digits
    torch.manual_seed(0)
    teacher, _ = fxopt.finetune(Blocks(), train, epochs=2, lr=0.05, progress=False)
    pruned = fxopt.compile(teacher, (train[0][0],), recipe="prune-50")
    unlabeled = [x for x, _ in train][:6]
    runs = {}
    import fxopt.train.distill as dmod
    for cache in (False, "auto", 1):
        seen = []
        real = dmod.Distiller.teacher_outputs

        def counting(self, call, key=None, _real=real):
            before = self.cache_hits
            out = _real(self, call, key)
            seen.append(self.cache_hits == before)   # True: the teacher ran
            return out
        dmod.Distiller.teacher_outputs = counting
        try:
            # "blocks.*": each block and its layers (nested paths: the taps of one saw the other as inside)
            runs[cache] = fxopt.finetune(pruned, unlabeled, distill="both", features=["blocks.*"], epochs=3,
                                         lr=0.02, teacher_cache=cache, progress=False)
        finally:
            dmod.Distiller.teacher_outputs = real
        runs[cache] += (sum(seen),)
    (a, ha, ran_a), (b, hb, ran_b), (c, hc, ran_c) = runs[False], runs["auto"], runs[1]
    # the same training, bit for bit
    assert [e["loss"] for e in ha.epochs] == [e["loss"] for e in hb.epochs] == [e["loss"] for e in hc.epochs]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the teacher ran on every batch once (+1: the first batch checks the shapes) instead of every epoch
    assert ran_a == 3 * 6 + 1 and ha.teacher_cache_hits == 0
    assert ran_b == 6 + 1 and hb.teacher_cache_hits == 2 * 6
    assert ran_c == 3 * 6 + 1 and hc.teacher_cache_hits == 0   # one byte of room: nothing kept
    # a DataLoader gives new tensors every epoch: never reused
    loader = torch.utils.data.DataLoader(torch.cat(unlabeled), batch_size=len(unlabeled[0]))
    _, hl = fxopt.finetune(pruned, loader, distill="hidden", epochs=2, lr=0.02, progress=False)
    assert hl.teacher_cache_hits == 0
    with pytest.raises(InputError, match="teacher_cache"):
        fxopt.finetune(pruned, unlabeled, distill="hidden", teacher_cache="yes", progress=False)


def test_the_teacher_cache_never_returns_targets_of_other_inputs():
    """A batch re-masked or edited in place between epochs, or a teacher that samples, must run the teacher
    again: the cached run must train exactly as the uncached one."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 4))

    class Noisy(torch.nn.Module):   # samples even in eval mode (a VAE's latent, say)
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, input):
            return self.fc(input) + torch.randn_like(input[:, :4])

    def run(cache, edit, t=teacher):
        g = torch.Generator().manual_seed(1)
        data = [{"input": torch.randn(16, 8, generator=g)} for _ in range(4)]

        def on_step(step, m):
            if step % len(data) == 0:   # a new epoch: new masks in the same dicts / the same tensors edited
                for d in data:
                    if edit == "replace":
                        d["input"] = torch.randn(16, 8, generator=g)
                    elif edit == "inplace":
                        d["input"].copy_(torch.randn(16, 8, generator=g))
        torch.manual_seed(0)
        out, h = fxopt.finetune(student, data, teacher=t, distill="logits", epochs=3, lr=0.05, seed=0,
                                teacher_cache=cache, on_step=on_step, progress=False)
        return [e["loss"] for e in h.epochs], h.teacher_cache_hits
    for edit in ("replace", "inplace"):
        (plain, _), (cached, hits) = run(False, edit), run("auto", edit)
        assert cached == plain and hits == 0, edit
    noisy = Noisy()
    (plain, _), (cached, hits) = run(False, None, noisy), run("auto", None, noisy)
    assert cached == plain and hits == 0
    assert run(2e9, None)[1] == 2 * 4   # unchanged batches are reused; a float budget is a number of bytes
    with pytest.raises(InputError, match="teacher_cache"):   # checked whatever the data and mode
        fxopt.finetune(student, iter([(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))]),
                       teacher_cache="yes", progress=False)


def test_a_compiled_model_trained_on_its_own_no_longer_distills_from_its_source(digits):
    """finetune without the source as teacher changes what the model approximates: later default teachers
    (finetune(distill=), gradual_prune) must be the trained model, not the untrained original."""
    from fxopt.train.distill import source_of
    train, _ = digits
    torch.manual_seed(0)
    orig = Blocks()
    c = fxopt.compile(orig, (train[0][0],), recipe="canonicalize")
    assert source_of(c) is orig
    distilled, _ = fxopt.finetune(c, train[:2], distill="logits", progress=False)
    assert source_of(distilled) is orig   # distilled from it: still its reference
    tuned, _ = fxopt.finetune(c, train[:2], progress=False)
    assert source_of(tuned) is None and source_of(c) is orig   # the input model keeps its own
    with pytest.raises(InputError, match="teacher"):
        fxopt.finetune(tuned, train[:2], distill="logits", progress=False)


def test_gradual_structured_pruning_distills_from_the_original_on_unlabeled_data(digits, monkeypatch):
    """Each step's student is compiled from the previous one: the teacher must stay the original; the
    channels are measured on the data (activation importance, re-fits), which may be inputs alone."""
    import fxopt.train.distill as dmod
    train, test = digits
    torch.manual_seed(0)
    teacher, _ = fxopt.finetune(Blocks(), train, epochs=3, lr=0.05, progress=False)
    unlabeled = [x for x, _ in train]
    teachers = []
    real = dmod.resolve_teacher
    monkeypatch.setattr(dmod, "resolve_teacher", lambda s, t: teachers.append(t) or real(s, t))
    student, hist = fxopt.gradual_prune(teacher, unlabeled, final_sparsity=0.5, epochs=3, end_epoch=2,
                                        structured=True, importance="activation", reconstruct=True,
                                        distill="hidden", optimizer="adamw", lr=1e-3, progress=False)
    assert len(teachers) == 3 and all(t is teacher for t in teachers)
    assert [e["pruned"] for e in hist.epochs] == [0.0, 0.4375, 0.5]
    assert hist.epochs[-1]["params"] < 0.6 * sum(p.numel() for p in teacher.parameters())
    records = [r for r in student.fxopt_history.records if r.name == "prune"]
    assert records and records[-1].info.get("reconstructed") is not None
    assert _acc(student, test) > 80
    with pytest.raises(InputError, match="structured=True"):
        fxopt.gradual_prune(teacher, unlabeled, reconstruct=True, distill="hidden", progress=False)


def test_distillation_errors_are_clear(digits, trained):
    train, _ = digits
    pruned = fxopt.compile(trained, (train[0][0],), recipe="prune-50")
    with pytest.raises(InputError, match="needs a teacher"):
        fxopt.finetune(DemoNet(width=16), train, distill="logits", progress=False)
    with pytest.raises(InputError, match="distill must be"):
        fxopt.finetune(pruned, train, distill="feature", progress=False)
    with pytest.raises(InputError, match="teacher's output has shape"):
        fxopt.finetune(pruned, train, teacher=DemoNet(width=16, num_classes=5), progress=False)
    with pytest.raises(InputError, match="no module 'nope'"):
        fxopt.finetune(pruned, train, teacher=trained, distill="hidden", features={"stem.0": "nope"}, progress=False)
    with pytest.raises(InputError, match="no node from module 'nope'"):
        fxopt.finetune(pruned, train, teacher=trained, distill="hidden", features={"nope": "stem.0"}, progress=False)
    with pytest.raises(InputError, match="empty"):
        fxopt.finetune(pruned, [], distill="logits", progress=False)
    bad = [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(InputError, match="NaN"):
        fxopt.finetune(pruned, bad, distill="logits", progress=False)
    with pytest.raises(InputError, match="does not run on a batch"):
        fxopt.finetune(pruned, [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))], distill="logits",
                       progress=False)
    with pytest.raises(InputError, match="alpha"):
        fxopt.finetune(pruned, train, distill="logits", alpha=2.0, progress=False)


# ---------------------------------------------------------------- QAT
def test_fake_quantize_is_the_simulation_forward_and_straight_through_backward():
    from fxopt.quant import qspec
    from fxopt.train.qat import fake_quantize
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 256, generator=g) * 3).requires_grad_(True)
    for scale, zp, qmin, qmax, gs in [(torch.tensor(0.05), torch.tensor(3), 0, 255, 0),
                                      (torch.rand(6, 1, generator=g) * 0.1 + 0.01, torch.zeros(6, 1, dtype=torch.int32),
                                       -127, 127, 0),
                                      (torch.rand(6, 2, generator=g) * 0.5 + 0.1,
                                       torch.randint(-8, 8, (6, 2), generator=g, dtype=torch.int8), -8, 7, 128)]:
        out = fake_quantize(x, scale, zp, qmin, qmax, gs)
        want = qspec.dequantize(qspec.quantize(x.detach(), scale, zp, qmin, qmax, gs), scale, zp, gs)
        assert torch.equal(out.detach(), want)
        out.sum().backward()
        # gradient 1 inside the range, 0 where clamped
        sb = scale.repeat_interleave(gs, -1) if gs else scale
        zb = zp.repeat_interleave(gs, -1) if gs else zp
        r = torch.round(x.detach() * (1.0 / sb)) + zb
        assert torch.equal(x.grad, ((r >= qmin) & (r <= qmax)).float())
        x.grad = None
    # LSQ: the scale gets a gradient that reduces a quantization error it causes
    s = torch.tensor(0.5, requires_grad=True)
    y = torch.linspace(-10, 10, 101)
    loss = (fake_quantize(y, s, torch.tensor(0), -7, 7, 0, learn=True) - y).pow(2).mean()
    loss.backward()
    assert s.grad is not None and s.grad < 0  # range too small (clamping at 3.5): grow the scale


@pytest.mark.parametrize("recipe", ["int4-weight", "int8"])
def test_qat_recovers_int4_and_lowers_to_the_ptq_kernels(digits, trained, recipe, tmp_path):
    train, test = digits
    before = state_hash(trained)
    calib = [x for x, _ in train[:4]]
    ptq = fxopt.compile(trained, (train[0][0],), recipe=recipe, calibration=calib)
    q = fxopt.qat(trained, (train[0][0],), train, recipe=recipe, epochs=2, progress=False)
    assert state_hash(trained) == before
    stage = q.fxopt_history.qat
    assert stage["codes_changed"] > 0 and len(stage["epochs"]) == 2
    assert stage["simulation_error"] < 1e-3  # the lowered graph computes what the trained simulation does
    assert _acc(q, test) >= _acc(ptq, test) - 0.6
    lowered_ops = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    ptq_ops = {str(n.target) for n in ptq.graph.nodes if n.op == "call_function"}
    assert {o for o in lowered_ops if "fxopt" in o} == {o for o in ptq_ops if "fxopt" in o}  # the same kernels
    names = [r.name for r in q.fxopt_history.records]
    assert names.index("fold-bn") < names.index("insert-qdq") < names.index("lower-quant")
    assert [r.index for r in q.fxopt_history.records] == list(range(1, len(names) + 1))
    assert "training stages" in str(q.fxopt_history)
    if recipe == "int8":  # a QAT model saves and loads like any compiled one
        fxopt.save(q, str(tmp_path / "q.fxopt"))
        back = fxopt.load(str(tmp_path / "q.fxopt"))
        torch.testing.assert_close(back(test[0][0]), q(test[0][0]))


def test_a_weight_gptq_rounds_off_its_nearest_code_starts_training_inside_that_code():
    from fxopt.quant import qspec
    from fxopt.train.qat import _within_codes
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    scale = w.reshape(16, 2, 128).abs().amax(-1) / 7
    zp = torch.randint(-1, 2, (16, 2), generator=g, dtype=torch.int8)
    rtn = qspec.quantize(w, scale, zp, -8, 7, 128)
    bump = torch.randint(-1, 2, rtn.shape, generator=g, dtype=torch.int8) * (torch.rand(rtn.shape, generator=g) < 0.2)
    codes = (rtn.to(torch.int32) + bump).clamp(-8, 7).to(torch.int8)   # GPTQ-like: some weights one code off
    off = codes != rtn
    latent, moved = _within_codes(w, codes, scale, zp, -8, 7, 128)
    assert moved == int(off.sum()) > 100
    assert torch.equal(qspec.quantize(latent, scale, zp, -8, 7, 128), codes)   # the forward is the PTQ model's
    assert torch.equal(latent[~off], w[~off])                                  # the others keep their float value
    # moved ones go to the nearest point of their code's interval: never further than to its centre
    centre = qspec.dequantize(codes, scale, zp, 128)
    assert bool(((latent - w).abs() <= (centre - w).abs() + 1e-6)[off].all())
    same, none = _within_codes(w, rtn, scale, zp, -8, 7, 128)
    assert none == 0 and same is w


def test_qat_starts_from_the_gptq_rounded_ptq_model():
    """With a learning rate that moves nothing, QAT of a GPTQ recipe returns the PTQ model (the same
    calibration: QAT's default for a GPTQ recipe is the first 32 batches); before, it trained from the
    round-to-nearest codes and lost GPTQ's rounding."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(12, 128, generator=g)
    xs = [torch.randn(64, 12, generator=g) @ basis + 0.05 * torch.randn(64, 128, generator=g) for _ in range(40)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    data = [(x, x) for x in xs]
    ptq = fxopt.compile(model, (xs[0],), recipe="int4-weight", calibration=xs[:32], progress=False)
    assert next(r for r in ptq.fxopt_history.records if r.name == "insert-qdq").info["gptq"]["layers"] == 2
    q = fxopt.qat(model, (xs[0],), data, recipe="int4-weight", epochs=1, lr=1e-12, progress=False)
    stage = q.fxopt_history.qat
    assert stage["started_off_nearest"] > 0 and stage["codes_changed"] == 0
    assert stage["freeze_after"] == 0   # re-observing would round to nearest again
    with torch.no_grad():
        for x in xs[32:]:
            torch.testing.assert_close(q(x), ptq(x))


def test_qat_dynamic_learned_scales_and_errors(digits):
    train, test = digits
    torch.manual_seed(0)
    mlp, _ = fxopt.finetune(Blocks(), train, epochs=2, lr=0.05, progress=False)
    q = fxopt.qat(mlp, (train[0][0],), train, recipe="int8-dynamic", epochs=1, learn_scales=True, progress=False)
    assert q.fxopt_history.qat["learn_scales"] and q.fxopt_history.qat["simulation_error"] < 1e-3
    assert _acc(q, test) > 80
    with pytest.raises(RecipeError, match="insert-qdq"):
        fxopt.qat(mlp, (train[0][0],), train, recipe="prune-50", progress=False)
    with pytest.raises(InputError, match="empty"):
        fxopt.qat(mlp, (train[0][0],), [], recipe="int8", progress=False)
    with pytest.raises(InputError, match="training data"):
        fxopt.qat(mlp, (train[0][0],), recipe="int8", progress=False)


# ---------------------------------------------------------------- transfer learning
def test_transfer_replaces_the_head_freezes_the_backbone_then_unfreezes(digits):
    train, test = digits
    torch.manual_seed(0)
    source, _ = fxopt.finetune(Blocks(out=10), train, epochs=2, lr=0.05, progress=False)
    before = state_hash(source)
    parity = [(x, y % 2) for x, y in train]   # a new task: odd or even
    m, h = fxopt.transfer(source, parity, num_outputs=2, epochs=2, lr=0.05, progress=False)
    assert state_hash(source) == before and h.head == "head" and m.head.out_features == 2
    assert torch.equal(m.inp.weight, source.inp.weight)  # frozen
    assert _evaluate(m, [(x, y % 2) for x, y in test], CE)[1] > 85
    m2, h2 = fxopt.transfer(source, parity, num_outputs=2, epochs=2, unfreeze_after=1, lr=0.05, progress=False)
    assert not torch.equal(m2.inp.weight, source.inp.weight) and [e["phase"] for e in h2.epochs] == ["head", "all"]
    # a compiled (pruned) graph: its output linear is replaced the same way
    pruned = fxopt.compile(source, (train[0][0],), recipe="prune-50")
    g, hg = fxopt.transfer(pruned, parity, num_outputs=2, epochs=1, lr=0.05, progress=False)
    assert g(train[0][0]).shape == (64, 2) and hg.head.startswith("head")


def test_transfer_errors_name_the_problem(digits, trained):
    train, _ = digits
    # DemoNet scales its logits by a per-class parameter after the head: a new width breaks it
    with pytest.raises(InputError, match="depends on its width"):
        fxopt.transfer(trained, train, num_outputs=5, progress=False)
    with pytest.raises(InputError, match="no module 'nope'"):
        fxopt.transfer(trained, train, num_outputs=10, head="nope", progress=False)
    with pytest.raises(InputError, match="num_outputs"):
        fxopt.transfer(trained, train, num_outputs=0, progress=False)
    with pytest.raises(InputError, match="match no parameter"):
        fxopt.transfer(Blocks(), train, num_outputs=10, freeze=["zzz*"], progress=False)


# ---------------------------------------------------------------- one recovery call
def test_one_recovery_call_prunes_distills_and_trains_int8(digits, trained, tmp_path):
    train, test = digits
    before = state_hash(trained)

    def accuracy(m):
        return _acc(m, test)
    out = fxopt.compile(trained, (train[0][0],), recipe="prune-50,int8", metric=accuracy,
                        recover={"data": train, "epochs": 2}, report=str(tmp_path / "r.html"))
    assert state_hash(trained) == before
    stages = out.fxopt_history.stages
    assert [s["stage"] for s in stages] == ["original", "compress", "distill", "qat"]
    assert stages[1]["metric"] < stages[0]["metric"] - 10 < stages[2]["metric"]
    assert stages[-1]["bytes"] < 0.15 * stages[0]["bytes"] and stages[-1]["params"] < 0.35 * stages[0]["params"]
    assert stages[-1]["metric"] == pytest.approx(accuracy(out))
    assert out.fxopt_history.metric["compiled"] == stages[-1]["metric"]
    assert "Training stages" in (tmp_path / "r.html").read_text()
    assert any(r.name == "prune" for r in out.fxopt_history.records)
    with pytest.raises(InputError, match="data"):
        fxopt.compile(trained, (train[0][0],), recipe="prune-50", recover={"epochs": 2})
    with pytest.raises(InputError, match="one-shot"):
        fxopt.compile(trained, (train[0][0],), recipe="prune-50", recover={"data": iter(train)})


# ---------------------------------------------------------------- regressions found in review
def test_qat_keeps_what_trained_besides_the_weights_and_reads_every_option(digits):
    train, _ = digits
    torch.manual_seed(0)
    mlp = Blocks()
    q = fxopt.qat(mlp, (train[0][0],), train[:4], recipe="int8-weight", epochs=1, lr=0.05, progress=False)
    assert q.fxopt_history.qat["simulation_error"] < 1e-5  # against the trained graph: biases came back too
    q2 = fxopt.qat(mlp, (train[0][0],), train[:2], recipe="int8-dynamic", epochs=1, lr=0.0, progress=False,
                   compile_options={"smoothquant": False})
    sq = next(r for r in q2.fxopt_history.records if r.name == "smooth-quant")
    assert sq.status == "unchanged"


def test_distillation_review_regressions(digits):
    train, _ = digits
    student, teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)), \
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    # a projection trains even when every student parameter has a learning-rate multiplier
    from fxopt.train import distill
    seen = {}
    orig = distill.Distiller.remove

    def keep(self):
        seen["w"] = self.projections["1"].linear.weight.detach().clone()
        orig(self)
    distill.Distiller.remove = keep
    try:
        fxopt.finetune(student, train[:3], teacher=teacher, distill="hidden", features={"1": "1"},
                       lr_multipliers={"*": 0.1}, lr=0.05, progress=False)
    finally:
        distill.Distiller.remove = orig
    init = torch.zeros(16, 12)
    init[:12, :12] = torch.eye(12)
    assert not torch.equal(seen["w"], init)
    # a bad teacher path leaves no hook on the student (inplace: the user's own module)
    with pytest.raises(InputError, match="no module 'nope'"):
        fxopt.finetune(student, train[:2], teacher=teacher, distill="hidden", features={"1": "nope"},
                       inplace=True, progress=False)
    assert not student[1]._forward_hooks


def test_transfer_and_recover_review_regressions(digits):
    train, test = digits

    class HeadFirst(nn.Module):  # the output layer registered before the body
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 10)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x))
    model = HeadFirst()
    model.body[1].bias.requires_grad_(False)  # the user froze this
    three = [(x, y % 3) for x, y in train[:3]]
    with pytest.raises(InputError, match="labels beyond the number of outputs"):
        fxopt.transfer(model, train[:3], num_outputs=3, progress=False)   # digits labels go to 9
    m, h = fxopt.transfer(model, three, num_outputs=3, epochs=2, unfreeze_after=1, progress=False)
    assert h.head == "head" and m.head.out_features == 3
    assert not m.body[1].bias.requires_grad and torch.equal(m.body[1].bias, model.body[1].bias)
    # the recovery call measures the original on a copy in eval mode: a train-mode model is not touched
    net = DemoNet(width=8).train()
    before = state_hash(net)
    fxopt.compile(net, (train[0][0],), recipe="prune-50", metric=lambda m: _acc(m, test),
                  recover={"data": train[:2], "epochs": 1})
    assert state_hash(net) == before


# ---------------------------------------------------------------- data-aware pruning in the recovery call
class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _on_a_subspace(n, seed):
    basis = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 4, generator=g) @ basis for _ in range(n)]


def test_the_recovery_call_prunes_both_ways_and_keeps_the_closer_one(digits, trained):
    """Inputs on a 4-dimensional subspace: fc2 can be re-fitted on the kept channels almost exactly, so
    the data-aware prune is far closer to the original and is chosen; on the digits CNN the history says
    what was chosen either way, the chosen error is the smaller one, and reconstruct=False prunes as written."""
    torch.manual_seed(0)
    model = _Wide().eval()
    data = _on_a_subspace(8, 1)
    out = fxopt.compile(model, (data[0],), recipe="prune-50", progress=False,
                        recover={"data": data, "epochs": 1, "lr": 1e-4})
    comp = out.fxopt_history.stages[0]
    assert comp["stage"] == "compress" and comp["pruning"]["chosen"] == "activation + reconstruct"
    errs = comp["pruning"]["output_error"]
    assert errs["activation + reconstruct"] < 0.1 * errs["weights (l1)"]
    assert "pruned by activation + reconstruct" in str(out.fxopt_history)
    prune = next(r for r in out.fxopt_history.records if r.name == "prune")
    assert "fc2" in prune.info["reconstructed"]
    test = torch.cat(_on_a_subspace(2, 2))
    assert (out(test) - model(test)).pow(2).mean() < 0.1 * model(test).pow(2).mean()

    train, _ = digits
    out = fxopt.compile(trained, (train[0][0],), recipe="prune-50", progress=False,
                        recover={"data": train[:4], "epochs": 1})
    p = out.fxopt_history.stages[0]["pruning"]
    assert p["chosen"] == min(p["output_error"], key=p["output_error"].get)
    plain = fxopt.compile(trained, (train[0][0],), recipe="prune-50", progress=False,
                          recover={"data": train[:4], "epochs": 1, "reconstruct": False})
    assert "pruning" not in plain.fxopt_history.stages[0]
    assert "reconstructed" not in next(r for r in plain.fxopt_history.records if r.name == "prune").info

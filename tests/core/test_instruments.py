"""Instruments (fxopt/passmgr/instruments.py): should-run (disable, stop_after, your own), analysis
hooks, the crash reproducer and `fxopt repro` (fxopt/passmgr/repro.py)."""
import os
import pickle
from dataclasses import dataclass

import pytest
import torch

import fxopt
from fxopt.cli.main import main
from fxopt.ir.dialect import aten, is_linear
from fxopt.passmgr.repro import read_reproducer, rerun
from models import MLP

X = torch.randn(4, 16)


@fxopt.register_pass
class ReproRaisePass(fxopt.Pass):
    """Fails on graphs with a linear: raises after a half-done edit (the manager rolls it back)."""

    name = "test-repro-raise"
    reads_options = ("calibration_batches",)

    @dataclass(frozen=True)
    class Config:
        message: str = "boom"

    def run(self, gm, ctx):
        lin = next((n for n in gm.graph.nodes if is_linear(n)), None)
        if lin is None:
            return fxopt.PassResult(False)
        lin.target = aten.sigmoid.default
        raise RuntimeError(f"{self.config.message} (calibration_batches={ctx.options.get('calibration_batches')})")


class SkipCse(fxopt.Instrument):
    def should_run(self, p, gm, ctx):
        return "vetoed" if p.name == "cse" else None


def test_a_should_run_instrument_skips_passes_and_the_history_says_why():
    out = fxopt.compile(MLP().eval(), (X,), recipe="dce,cse,dce", instruments=[SkipCse()])
    assert [(r.name, r.status) for r in out.fxopt_history.records] == \
        [("dce", "unchanged"), ("cse", "vetoed"), ("dce", "unchanged")]


def test_disable_and_stop_after_are_should_run_instruments():
    out = fxopt.compile(MLP().eval(), (X,), recipe="dce,cse,dce,cse", disable=["cse"], stop_after=1)
    assert [r.status for r in out.fxopt_history.records] == ["unchanged", "disabled", "skipped", "disabled"]
    # counts start afresh on every run of one manager
    pm = fxopt.PassManager("dce,cse", stop_after=1)
    for _ in range(2):
        res = pm.run(fxopt.trace(MLP().eval(), (X,)), (X,))
        assert [r.status for r in res.history.records] == ["unchanged", "skipped"]
    with pytest.raises(ValueError):
        fxopt.StopAfter(-1)


class Analyses(fxopt.Instrument):
    def __init__(self):
        self.seen = []

    def after_analysis(self, name, gm, ctx, result, cached, seconds):
        self.seen.append((name, cached))


def test_analysis_hooks_see_computed_and_cached_results():
    spy, timing = Analyses(), fxopt.TimingReport()
    gm = fxopt.trace(MLP().eval(), (X,))
    fxopt.PassManager("cse,prune(ratio=0.5)", instruments=[spy, timing]).run(gm, (X,))
    assert ("cost", False) in spy.seen and ("channel-groups", False) in spy.seen
    assert ("cost", True) in spy.seen or spy.seen.count(("cost", False)) >= 2
    assert any(n == "analysis:cost" for n, _ in timing.analysis_times) and "analysis:cost" in timing.report()
    am = fxopt.AnalysisManager(instruments=[spy])
    spy.seen.clear()
    am.get("shapes", gm)
    am.get("shapes", gm)
    assert spy.seen == [("shapes", False), ("shapes", True)]


def test_a_failing_pass_leaves_a_reproducer_that_reruns_with_one_command(tmp_path, capsys):
    repro = tmp_path / "crash"
    model = MLP().eval()
    out = fxopt.compile(model, (X,), recipe="cse,test-repro-raise(message=kaboom),dce", reproducer=str(repro),
                        calibration_batches=3)
    (failed,) = out.fxopt_history.failures
    assert failed.name == "test-repro-raise" and "kaboom" in failed.error
    assert sorted(os.listdir(repro)) == ["README.txt", "graph.fxopt", "inputs.pt", "options.json", "pipeline.txt"]
    gm, pipeline, args, kwargs, options = read_reproducer(repro)
    assert pipeline == "test-repro-raise(message=kaboom)" and options == {"calibration_batches": 3}
    assert torch.equal(args[0], X) and kwargs == {}
    with torch.no_grad():   # the graph before the failing pass: it still computes the model
        assert torch.allclose(gm(X), model(X), atol=1e-6)
    assert f"fxopt repro {repro}" in (repro / "README.txt").read_text()
    with pytest.raises(fxopt.PassError, match="kaboom.*calibration_batches=3"):
        rerun(repro)
    assert main(["repro", str(repro)]) == 1
    assert "kaboom" in capsys.readouterr().err
    assert main(["repro", str(repro), "--no-strict"]) == 1
    assert "failed again" in capsys.readouterr().out


def test_no_reproducer_is_written_when_every_pass_succeeds(tmp_path):
    fxopt.compile(MLP().eval(), (X,), recipe="cse,dce", reproducer=str(tmp_path / "crash"))
    assert not (tmp_path / "crash").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("FXOPT_TEST_PWNED", "/tmp/fxopt-pwned"),))


def test_a_crafted_reproducer_is_refused_without_running_code(tmp_path, monkeypatch):
    repro = tmp_path / "crash"
    fxopt.compile(MLP().eval(), (X,), recipe="test-repro-raise", reproducer=str(repro))
    flag = tmp_path / "pwned"
    monkeypatch.setenv("FXOPT_TEST_PWNED", str(flag))
    with open(repro / "inputs.pt", "wb") as f:
        pickle.dump({"args": (_Evil(),), "kwargs": {}}, f)
    with pytest.raises(fxopt.LoadError, match="inputs.pt"):
        read_reproducer(repro)
    assert main(["repro", str(repro)]) == 1 and not flag.exists()
    (repro / "graph.fxopt").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(fxopt.LoadError):
        read_reproducer(repro)
    with pytest.raises(fxopt.InputError):
        read_reproducer(tmp_path / "nowhere")

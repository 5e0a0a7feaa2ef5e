"""bench/gpu.py, the script a lent GPU runs first, runs end to end here in its smoke mode (tiny shapes, the
Triton kernels under the interpreter): every check passes, every op gets a row, errors are empty."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
from fxopt.kernels.triton_common import runs_triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not runs_triton(torch.empty(0, device=DEV)),
                                reason="Triton kernels neither compiled (no GPU) nor interpreted here")


def _run(tmp_path, *flags):
    import gpu
    gpu.RESULTS.update({"checks": [], "kernels": [], "e2e": [], "errors": []})
    rc = gpu.main(["--smoke", "--out", str(tmp_path), *flags])
    return rc, json.loads((tmp_path / "gpu.json").read_text())


def test_the_smoke_run_checks_every_op_and_fills_the_kernel_table(tmp_path):
    rc, res = _run(tmp_path, "--skip-e2e")
    assert rc == 0 and res["errors"] == [], res["errors"]
    ops = {c["op"] for c in res["checks"]}
    assert {"int8-dynamic", "int8-static+gelu", "int8-weight", "2:4"} <= ops and any("int4" in o for o in ops)
    assert all(c["ok"] == "yes" and c["runs"] >= 1 for c in res["checks"])
    assert max(c["runs"] for c in res["checks"]) > 1  # every tile config of a list, not just the tuned one
    fx_rows = [r for r in res["kernels"] if r["kernel"].startswith("fxopt ")]
    assert {r["kernel"].split()[1] for r in fx_rows} >= {"int8-dynamic", "int8-weight", "2:4", "bsr32"}
    assert all(float(r["rel err"]) < 1e-4 for r in fx_rows)  # fp32 activations in the smoke run


@pytest.mark.slow
def test_the_smoke_run_compiles_the_models_end_to_end(tmp_path):
    rc, res = _run(tmp_path, "--skip-checks")
    assert res["errors"] == [], res["errors"]
    variants = {(r["model"], r["variant"]) for r in res["e2e"]}
    for model in ("MiniLM-L6 (BERT 384)", "Llama 1.1B prefill", "Llama 1.1B decode step"):
        for v in ("fxopt int8-dynamic", "fxopt int4-weight", "fxopt 2:4"):
            assert (model, v) in variants
    assert all(float(r["cos"]) > 0.85 for r in res["e2e"])

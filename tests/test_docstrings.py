"""Every example in a public docstring runs (STYLE: docstrings have a short example that runs)."""
import doctest
import importlib

import pytest

MODULES = ["fxopt", "fxopt.api", "fxopt.ir.capture", "fxopt.passmgr.manager", "fxopt.passmgr.pipeline", "fxopt.passmgr.recipes",
           "fxopt.archive.serialize", "fxopt.backend", "fxopt.passes.cleanup.cleanup", "fxopt.viz.summarize", "fxopt.viz.graph_diff",
           "fxopt.viz.graph_render", "fxopt.train.training", "fxopt.quant.qspec", "fxopt.quant.observers", "fxopt.quant.calibrate",
           "fxopt.quant.qops", "fxopt.quant.sensitivity", "fxopt.passmgr.timeout", "fxopt.ir.torch_compat", "fxopt.kernels.cpu_isa",
           "fxopt.archive.archive_check", "fxopt.archive.graph_check", "fxopt.archive.expr_check"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

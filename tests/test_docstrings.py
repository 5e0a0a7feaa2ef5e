"""Every example in a public docstring runs (STYLE: docstrings have a short example that runs)."""
import doctest
import importlib

import pytest

MODULES = ["fxopt", "fxopt.api", "fxopt.capture", "fxopt.manager", "fxopt.pipeline", "fxopt.recipes",
           "fxopt.serialize", "fxopt.backend", "fxopt.passes.cleanup", "fxopt.summarize", "fxopt.graph_diff",
           "fxopt.graph_render", "fxopt.training", "fxopt.qspec", "fxopt.observers", "fxopt.calibrate",
           "fxopt.qops", "fxopt.sensitivity", "fxopt.timeout", "fxopt.torch_compat", "fxopt.kernels.cpu_isa",
           "fxopt.archive_check", "fxopt.graph_check", "fxopt.expr_check"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

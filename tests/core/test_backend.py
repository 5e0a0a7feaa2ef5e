import pytest
import torch

import fxopt
from models import Branchy


def test_backend_optimizes_what_trace_rejects():
    model = Branchy().eval()
    with torch.no_grad():
        model.fc.weight.abs_()
        model.fc.bias.zero_()
    x = torch.rand(3, 4) + 0.1  # fc(x).sum() > 0, and < 0 for -x: both branches of the if
    with pytest.raises(fxopt.TraceError):
        fxopt.trace(model, (x,))
    backend = fxopt.Backend(recipe="default")
    torch._dynamo.reset()
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for inp in (x, -x, 2 * x):
            assert torch.allclose(fast(inp), model(inp), atol=1e-6)
    assert len(backend.histories) >= 2 and not backend.fallbacks
    removed = sum(r.removed for h in backend.histories for r in h.records if r.changed)
    assert removed >= 1  # the `* 1` and `+ 0` are gone from the captured pieces


def test_named_backend_and_options():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    fast = torch.compile(model, backend="fxopt", options={"recipe": "dce"}, dynamic=False)
    assert torch.allclose(fast(x), model(x))
    from fxopt.backend import fxopt_backend
    assert fxopt_backend.histories and fxopt_backend.histories[-1].pipeline == "dce"


def test_a_typo_in_the_recipe_is_an_error_not_a_silent_eager_run():
    with pytest.raises(fxopt.RecipeError, match="int8-dynamc"):
        fxopt.Backend(recipe="int8-dynamc")
    f = torch.compile(torch.nn.Linear(4, 4), backend="fxopt", options={"recipe": "int8-dynamc"})
    with pytest.raises(Exception, match="unknown recipe 'int8-dynamc'"):
        f(torch.randn(2, 4))

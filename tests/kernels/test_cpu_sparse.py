"""The CSR linear kernel against the dense linear it replaces (its reference)."""
from __future__ import annotations

import pytest
import torch

from fxopt.kernels.cpu_sparse import to_csr


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
@pytest.mark.parametrize("x_shape, n, bias", [((5, 37), 11, True), ((2, 3, 64), 7, False), ((1, 1), 1, True)])
def test_linear_csr_equals_the_dense_linear(density, x_shape, n, bias):
    g = torch.Generator().manual_seed(0)
    k = x_shape[-1]
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    w[0] = 0  # an empty row
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*x_shape, generator=g)
    crow, col, values = to_csr(w)
    assert crow.dtype == col.dtype == torch.int32 and values.numel() == int((w != 0).sum())
    out = torch.ops.fxopt.linear_csr(x, crow, col, values, k, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_linear_csr_has_a_fake_implementation_for_export():
    from torch._subclasses.fake_tensor import FakeTensorMode
    crow, col, values = to_csr(torch.eye(4))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.fxopt.linear_csr(torch.empty(3, 2, 4), crow, col, values, 4, None)
    assert out.shape == (3, 2, 4)

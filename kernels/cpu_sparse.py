"""CSR sparse linear on CPU as ``torch.ops.fxopt.linear_csr`` (what ``lower-sparse`` emits).

The weight is stored as plain CSR arrays (int32 row pointers and column indices, fp32
values), so the graph saves and exports; each call wraps them in a ``torch.sparse_csr``
tensor (no copy) and runs ``torch.sparse.mm``. Measured on this 2-core CPU
(``python bench/prune.py --section d``): faster than the dense linear only from about
90% zeros, so ``lower-sparse`` only takes layers at or below its ``max_density``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.library import custom_op

__all__ = ["linear_csr", "to_csr"]


def to_csr(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_indices int32, col_indices int32, values) of a 2-D weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = w.detach().to_sparse_csr()
    # clones: the accessors return views whose base is the sparse tensor (export cannot fake those)
    return (csr.crow_indices().to(torch.int32).clone(), csr.col_indices().to(torch.int32).clone(),
            csr.values().clone())


@custom_op("fxopt::linear_csr", mutates_args=())
def linear_csr(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    n = crow.numel() - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch.sparse_csr_tensor(crow, col, values, (n, in_features))
    x2 = x.reshape(-1, in_features)
    out = torch.sparse.mm(w, x2.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


@linear_csr.register_fake
def _(x, crow, col, values, in_features, bias):
    return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))

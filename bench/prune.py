"""Pruning and sparsity benchmark (work in progress: see the issue note).

    python bench/prune.py [--repeats 20]

Implemented so far:
  (c) weight sparsity on a residual CNN with batch norm trained on scikit-learn's digits:
      accuracy dense, after pruning, and after a short fine-tune (fxopt.finetune keeps the zeros);
  (d) CPU sparse matmul (torch.sparse CSR) against dense linear at several sparsities, to see
      where unstructured sparsity could pay on this CPU.
Not yet: (a) structured prune-50 against Torch-Pruning on the digits CNN, (b) ResNet-50 prune-50
latency; they need the structured pruning pass.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxopt  # noqa: E402
from fxopt.models import DemoNet  # noqa: E402
from fxopt.passes.sparsity import sparsity_report  # noqa: E402
from fxopt.training import _evaluate  # noqa: E402


def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return [(x[tr[i:i + 64]], y[tr[i:i + 64]]) for i in range(0, 1400, 64)], [(x[te], y[te])]


def table(rows):
    cols = list(rows[0])
    widths = [max(len(str(r[c])) for r in rows + [dict(zip(cols, cols))]) for c in cols]
    line = lambda r: "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths))  # noqa: E731
    return "\n".join([line(dict(zip(cols, cols))), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def median_ms(fn, repeats):
    with torch.no_grad():
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def sparsity_rows(repeats):
    train, test = digits()
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=8, lr=0.05, progress=False)
    ce = nn.functional.cross_entropy
    base = fxopt.compile(dense, (train[0][0],))
    x = test[0][0]
    t_dense = median_ms(lambda: base(x), repeats)
    rows = [{"recipe": "default (dense)", "mean zeros per pruned layer": "-", "accuracy": f"{_evaluate(base, test, ce)[1]:.2f}",
             "after 5-epoch fine-tune": "-", "latency vs dense": "1.00x"}]
    for recipe in ("sparse-2:4", "magnitude-prune(ratio=0.5)", "magnitude-prune(ratio=0.75)",
                   "magnitude-prune(ratio=0.9,scope=global)"):
        pruned = fxopt.compile(dense, (train[0][0],), recipe=recipe if recipe.startswith("sparse") else f"default,{recipe}")
        acc0 = _evaluate(pruned, test, ce)[1]
        tuned, _ = fxopt.finetune(pruned, train, epochs=5, lr=0.01, progress=False)
        acc1 = _evaluate(tuned, test, ce)[1]
        zeros = sparsity_report(tuned)
        t = median_ms(lambda: tuned(x), repeats)
        rows.append({"recipe": recipe, "mean zeros per pruned layer": f"{100 * sum(zeros.values()) / max(1, len(zeros)):.0f}%",
                     "accuracy": f"{acc0:.2f}", "after 5-epoch fine-tune": f"{acc1:.2f}",
                     "latency vs dense": f"{t_dense / t:.2f}x"})
    return rows


def sparse_matmul_rows(repeats):
    torch.manual_seed(0)
    rows = []
    x = torch.randn(64, 1024)
    for sparsity in (0.5, 0.9, 0.95, 0.99):
        w = torch.randn(1024, 1024)
        w[torch.rand_like(w) < sparsity] = 0
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = w.to_sparse_csr()
        dense_ms = median_ms(lambda: torch.nn.functional.linear(x, w), repeats)
        sparse_ms = median_ms(lambda: torch.sparse.mm(csr, x.t()).t(), repeats)
        rows.append({"sparsity": f"{sparsity:.0%}", "dense linear ms": f"{dense_ms:.3f}",
                     "CSR sparse.mm ms": f"{sparse_ms:.3f}", "sparse speedup": f"{dense_ms / sparse_ms:.2f}x"})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ns = ap.parse_args()
    c = sparsity_rows(ns.repeats)
    d = sparse_matmul_rows(ns.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {ns.repeats}\n")
    print("(c) weight sparsity, DemoNet(width=32) trained 8 epochs on digits, 397 held-out images; "
          "pruned layers still run dense kernels (no sparse lowering yet), so latency differences are "
          "timing noise\n")
    print(table(c))
    print("\n(d) CPU sparse matmul: linear 64x1024 @ 1024x1024, dense vs torch.sparse CSR\n")
    print(table(d))


if __name__ == "__main__":
    main()

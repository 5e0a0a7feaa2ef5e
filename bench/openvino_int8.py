"""fxopt's int8 graph against NNCF's on the same runtime (OpenVINO), ResNet-50 8x224, one process.

    python bench/openvino_int8.py [--model resnet50|digits] [--repeats 15] [--profile]

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
  ``fxopt.export_onnx``), which OpenVINO runs far slower;
* the first with its global average pool written as the ``ReduceMean`` the exporter emits, as fxopt's
  files had it before ``pool_spatial_means`` (``fxopt.runtime.onnx_prepare``) wrote it as an ``AveragePool``.

Accuracy: min cosine of the logits against eager fp32 on 4 held-out batches. ``--model digits``: the
digits CNN of ``bench/cpu.py`` (DemoNet(width=32) trained 8 epochs on scikit-learn's digits, timed on the
397 held-out images as one batch, calibrated on training images; accuracy on the 397). Needs
``pip install -e ".[bench]"`` (OpenVINO, NNCF).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("resnet50", "digits"), default="resnet50")
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
    if ns.model == "resnet50":
        model = torchvision.models.resnet50().eval()
        gen = torch.Generator().manual_seed(1)
        evals = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        title = "ResNet-50 (random init) 8x224"
    else:
        from cpu import _train_digits
        from prune import digits
        from fxopt.models import DemoNet
        train, test = digits()
        model = DemoNet(width=32)
        with tempfile.TemporaryDirectory() as tmp:
            _train_digits(os.path.join(tmp, "digits.pt"))
            model.load_state_dict(torch.load(os.path.join(tmp, "digits.pt"), weights_only=True))
        model.eval()
        evals = [test[0][0]]
        flat = torch.cat([x for x, _ in train])
        n = len(evals[0])   # NNCF calibrates on batches of the exported shape
        calib = [flat[i:i + n] for i in range(0, len(flat) - n + 1, n)]
        title = f"digits CNN {n}x1x8x8"
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
            if res == "true":   # the mean as the exporter writes it (the pool rewrite switched off for this file)
                forms += ((False, "fxopt int8, residuals quantized, pool as ReduceMean"),)
            for portable, label in forms:
                path = os.path.join(tmp, f"{res}-{portable}-{len(compiled)}.onnx")
                with _pool_rewrite(not label.endswith("ReduceMean")):
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
        rows.append({"OpenVINO model": k, "ms": f"{ms[k]:.2f}" if ms[k] < 10 else f"{ms[k]:.1f}",
                     "vs NNCF": f"{ms['NNCF int8'] / ms[k]:.2f}x", "min cosine": f"{cos:.4f}"})
        if ns.model == "digits":
            top1 = float((torch.as_tensor(c(x)[0]).argmax(1) == test[0][1]).float().mean()) * 100
            rows[-1]["held-out top-1"] = f"{top1:.2f}%"
    print(f"cpu: {cpu_isa.cpu_info().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"OpenVINO {ov.__version__}, NNCF {nncf.__version__}; {title}, interleaved, "
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
            d = 2 if total < 10 else 1   # a small model's pool or reduction shows in hundredths
            print(f"{k}: {total:.{d}f} ms profiled; " + ", ".join(f"{kind} {ms:.{d}f} ms ({ms / total:.0%})"
                                                                  for kind, ms in by.most_common(3)))


@contextlib.contextmanager
def _pool_rewrite(on: bool):
    """``fxopt.export_onnx`` with its global-average-pool rewrite on (as always) or off (the file as before)."""
    from fxopt.runtime import onnx_export
    real = onnx_export.pool_spatial_means
    if not on:
        onnx_export.pool_spatial_means = lambda proto: 0
    try:
        yield
    finally:
        onnx_export.pool_spatial_means = real


if __name__ == "__main__":
    main()

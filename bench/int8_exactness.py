"""Do this CPU's ONNX runtimes sum int8 products exactly? The evidence behind ``export_onnx(portable=True)``.

    python bench/int8_exactness.py

On x86 CPUs without VNNI, u8 x s8 int8 kernels multiply with ``vpmaddubsw``, which adds two products into
a saturating int16: 8-bit activation codes times 8-bit weights can overflow it, 7-bit codes or 7-bit
weights cannot, and u8 x u8 kernels widen to int16 first. This script runs single layers in ONNX Runtime
and OpenVINO (where installed) with every product at its extreme and prints the largest error against
exact integer arithmetic:

* ``MatMulInteger`` (what fxopt's int8 linears export to), in int32 units of the accumulator;
* the QDQ convolution (``Q/DQ(x) -> Conv(DQ(W)) -> Q/DQ``, what runtimes fuse into int8 convs), in output
  quantization steps, for 1, 3 and 16 input channels.

Rows: 8-bit codes x 8-bit signed weights (what a VNNI plan writes with ``portable=False``), the same
weights as uint8 on zero point 128 (what ``portable=True`` writes), 8-bit codes x 7-bit weights (fxopt's
plan without VNNI) and 7-bit codes x 8-bit weights. 0 everywhere means this CPU's runtimes are exact.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def _model(nodes: list, inputs: list, outputs: list, inits: dict) -> bytes:
    from onnx import helper, numpy_helper
    graph = helper.make_graph(nodes, "probe", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _runners() -> dict:
    out = {}
    try:
        import onnxruntime as ort

        def run_ort(data: bytes, feeds: dict) -> np.ndarray:
            return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        out["ONNX Runtime " + ort.__version__] = run_ort
    except ImportError:
        pass
    try:
        import openvino as ov

        def run_ov(data: bytes, feeds: dict) -> np.ndarray:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(model=data, weights=b""), "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f32"})
            return compiled(list(feeds.values()))[compiled.outputs[0]]
        out["OpenVINO " + ov.__version__.split("-")[0]] = run_ov
    except ImportError:
        pass
    return out


def _weights(shape: tuple, top: int) -> np.ndarray:
    """[K, N] weights at +-top, one sign per output column: along the reduction every pair a saturating
    int16 adds is at the same extreme."""
    w = np.full(shape, top, dtype=np.int8)
    w[:, 1::2] *= -1
    return w


def matmul_error(run, form: str) -> int:
    """Largest |MatMulInteger - exact| over a batch whose codes are all at their top."""
    from onnx import TensorProto, helper
    k, n = 64, 32
    top_a, top_w = (127, 127) if form == "7-bit codes" else (255, 63 if form == "7-bit weights" else 127)
    w = _weights((k, n), top_w)
    a = np.full((4, k), top_a, dtype=np.uint8)
    exact = a.astype(np.int64) @ w.astype(np.int64)
    inits = {"w": w, "a_zp": np.uint8(0)}
    names = ["a", "w", "a_zp"]
    if form == "uint8 weights":
        inits["w"], inits["w_zp"] = (w.astype(np.int16) + 128).astype(np.uint8), np.uint8(128)
        names.append("w_zp")
    data = _model([helper.make_node("MatMulInteger", names, ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", k])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", n])], inits)
    return int(np.abs(run(data, {"a": a}).astype(np.int64) - exact).max())


def conv_error(run, form: str, cin: int) -> float:
    """Largest |QDQ conv - exact| in output steps, every input code at its top."""
    import torch
    from onnx import TensorProto, helper
    top_w = 63 if form == "7-bit weights" else 127
    w = np.full((8, cin, 3, 3), top_w, dtype=np.int8)
    w[1::2] *= -1
    x_scale, w_scale = 0.01, 0.001
    x_top = 127 if form == "7-bit codes" else 255
    x = np.full((1, cin, 8, 8), x_top * x_scale, dtype=np.float32)
    out_scale = 9 * cin * x_top * top_w * x_scale * w_scale / 200  # the largest sum lands near code 200
    w_store, w_zp = (w, np.zeros(8, np.int8)) if form != "uint8 weights" else \
        ((w.astype(np.int16) + 128).astype(np.uint8), np.full(8, 128, np.uint8))
    inits = {"xs": np.float32(x_scale), "xz": np.uint8(0), "w": w_store, "ws": np.full(8, w_scale, np.float32),
             "wz": w_zp, "os": np.float32(out_scale)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "os", "xz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "os", "xz"], ["y"])]
    data = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    codes = np.clip(np.round(x / x_scale), 0, 255) * x_scale
    conv = torch.nn.functional.conv2d(torch.from_numpy(codes), torch.from_numpy(w.astype(np.float32) * w_scale),
                                      padding=1).numpy()
    exact = np.clip(np.round(conv / out_scale), 0, 255) * out_scale
    return float(np.abs(run(data, {"x": x}) - exact).max() / out_scale)


FORMS = ["8-bit codes x int8 weights", "uint8 weights", "7-bit weights", "7-bit codes"]


def main() -> None:
    from common import table
    from fxopt.kernels import cpu_isa
    print(f"cpu: {cpu_isa.cpu_info(probe=False).describe()}; runtimes' int8 dot products exact by the CPU's "
          f"flags: {cpu_isa.dot_products_exact()}")
    runners = _runners()
    if not runners:
        raise SystemExit('install a runtime first: pip install "fxopt[onnxruntime]" or "fxopt[openvino]"')
    rows = []
    for name, run in runners.items():
        for form in FORMS:
            row = {"runtime": name, "form": form, "MatMulInteger (int32 units)": matmul_error(run, form)}
            for cin in (1, 3, 16):
                row[f"QDQ conv, {cin} in-channel(s) (steps)"] = f"{conv_error(run, form, cin):.0f}"
            rows.append(row)
    print("\nlargest error against exact integer arithmetic, every product at its extreme (0: exact)")
    print(table(rows))


if __name__ == "__main__":
    main()

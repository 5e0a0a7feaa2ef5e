"""fxopt's GPU kernels on the device: correctness first, then speed against torch's own, then whole models.

    python bench/gpu.py                  # a CUDA machine: checks, kernel table, end to end (~5 min on an H200)
    python bench/gpu.py --skip-e2e       # the kernels only
    python bench/gpu.py --smoke          # anywhere: tiny shapes, Triton's interpreter on CPU (what CI runs);
                                         # its timings mean nothing
    python bench/gpu.py --out DIR        # also write gpu.json (every number) there

1. **Device and ceilings**: its name, SMs, torch/Triton/CUDA versions; a device-to-device copy
   (bytes read + written), a bf16 8192^3 ``torch.mm`` and an int8 8192^3 ``torch._int_mm`` on
   random data, the ceilings the table's fractions use (measured here, not data-sheet numbers).
2. **Checks**: every fxopt GPU op on fresh random inputs against its reference (the simulation
   ``lower-quant``/``lower-sparse`` verify against), at odd shapes that cross tile edges, every
   tile config each op may pick (the tuner is bypassed so each one runs), every plan choice,
   bf16, fp16 and fp32 activations. ``rel = |out - ref| / |ref|`` (Frobenius); NaN never passes.
3. **Kernels**: each op x M in (1, 16, 128, 4096) x N = K in (4096, 8192), bf16 activations:
   median ms (``triton.testing.do_bench``, which flushes the L2 between calls, so weights stream
   from HBM), TFLOPS (2MNK / time), GB/s (weight bytes as stored + activations + output), the
   fraction of the measured ceiling (compute or bandwidth, whichever is nearer), and the ratio to
   the bf16 ``F.linear`` (cuBLAS) of the same shape. Peers in the same run: bf16 cuBLAS,
   ``torch._int_mm`` (the int8 GEMM alone, no quantization), torch's semi-structured 2:4 GEMM,
   torchao's int8-dynamic and int4-weight where torchao is installed.
4. **End to end**: MiniLM-L6 shaped BERT (batch 32 x 128 tokens) and a 1.1B Llama (TinyLlama's
   shape: 22 layers, 2048 wide, 4 KV heads) from transformers configs with seeded random weights
   (speed does not depend on the values; nothing is downloaded), bf16: eager, ``torch.compile``,
   and ``fxopt.compile`` with int8-dynamic, int8-weight, int4-weight and 2:4 (``sparse-2:4`` then
   ``lower-sparse``); prefill 1 x 2048 and a decode-shaped step (1 token, no KV cache: at 2048
   tokens of context the cache is ~2% of the weight bytes). Each row gives the median ms, the
   ratio to eager bf16, and the cosine of its output to eager bf16's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fxopt's kernels are imported

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

T0 = time.perf_counter()
RESULTS: dict = {"checks": [], "kernels": [], "e2e": [], "errors": []}


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# ---------------------------------------------------------------- timing
def bench_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    from fxopt.kernels.triton_common import time_call
    return time_call(fn, reps=3, warmup=1)


# ---------------------------------------------------------------- weights in fxopt's stored layouts
def quant_int8(w: torch.Tensor):
    s = (w.float().abs().amax(1, keepdim=True) / 127).clamp_min(1e-8)
    return torch.round(w.float() / s).clamp(-127, 127).to(torch.int8), s.reshape(-1)


def quant_int4(w: torch.Tensor, group: int):
    from fxopt.kernels.cpu_quant import pack_int4
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-8)
    zp = torch.round(-8 - lo / s).clamp(-8, 7)
    q = torch.round(g / s[..., None] + zp[..., None]).clamp(-8, 7).reshape(n, k).to(torch.int8)
    return pack_int4(q.cpu()).to(w.device), s, zp.to(torch.int8)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4)
    keep = g.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, keep, True)
    return (g * mask).reshape(w.shape)


def block_sparse(w: torch.Tensor, density: float, block: int = 32, seed: int = 0) -> torch.Tensor:
    n, k = w.shape
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(-(-n // block), -(-k // block), generator=g) < density).to(w.device)
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return w * mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- the ops, as callables of x
def op_table(w: torch.Tensor, bias: torch.Tensor | None, sparse_density: float = 0.1):
    """name -> (fn(x, plan) -> out, ref(x) -> the simulated output, weight bytes as stored, int8 math?)."""
    from fxopt.kernels import triton_int8 as k8
    from fxopt.kernels import triton_sparse as ks
    from fxopt.kernels import triton_wq as kw
    fx = torch.ops.fxopt
    n, k = w.shape

    def b(x):  # the float kernels take the bias in the activation dtype, as lowered graphs hold it
        return None if bias is None else bias.to(x.dtype)
    q8, s8 = quant_int8(w)
    group = 128 if k % 128 == 0 else (32 if k % 32 == 0 else 0)
    ops = {
        "int8-dynamic": (lambda x, p="triton": fx.linear_int8_dynamic_gpu(x, q8, s8, bias, 127, "none", p),
                         lambda x: k8.linear_int8_dynamic_gpu_reference(x, q8, s8, bias), n * k + 4 * n, True),
        "int8-static+gelu": (lambda x, p="triton": fx.linear_int8_gpu(x, q8, s8, bias, 0.05, 131, 255, "gelu", p),
                             lambda x: k8.linear_int8_gpu_reference(x, q8, s8, bias, 0.05, 131, 255, "gelu"),
                             n * k + 4 * n, True),
        "int8-weight": (lambda x, p="triton": fx.linear_wq_gpu(x, q8, s8.reshape(-1, 1), torch.zeros_like(
                            s8.reshape(-1, 1), dtype=torch.int8), b(x), 0, 8, p),
                        lambda x: kw.linear_wq_gpu_reference(x, q8, s8.reshape(-1, 1), torch.zeros_like(
                            s8.reshape(-1, 1), dtype=torch.int8), b(x), 0, 8), n * k + 5 * n, False),
    }
    if group and k % 2 == 0:
        q4, s4, z4 = quant_int4(w, group)
        ops[f"int4-weight g{group}"] = (lambda x, p="triton": fx.linear_wq_gpu(x, q4, s4, z4, b(x), group, 4, p),
                                       lambda x: kw.linear_wq_gpu_reference(x, q4, s4, z4, b(x), group, 4),
                                       n * k // 2 + 5 * n * (k // group), False)
    if k % 4 == 0:
        vals, meta = ks.compress_24(prune_24(w))
        ops["2:4"] = (lambda x, p="triton": fx.linear_24_gpu(x, vals, meta, b(x), p),
                      lambda x: ks.linear_24_gpu_reference(x, vals, meta, b(x)),
                      vals.numel() * vals.element_size() + meta.numel(), False)
    crow, col, blocks = ks.to_bsr(block_sparse(w, sparse_density), 32)
    ops[f"bsr32 {sparse_density:.0%}"] = (
        lambda x, p="triton": fx.linear_bsr_gpu(x, crow, col, blocks, n, b(x), p),
        lambda x: ks.linear_bsr_gpu_reference(x, crow, col, blocks, n, b(x)),
        blocks.numel() * blocks.element_size() + 4 * (crow.numel() + col.numel()), False)
    return ops


def plan_choices(name: str) -> list[str]:
    if name.startswith("int8-d") or name.startswith("int8-s"):
        return ["triton", "int_mm"]
    if name == "2:4":
        return ["triton", "torch24"]
    return ["triton"]


TOL = {torch.float32: 1e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


# ---------------------------------------------------------------- 1. ceilings
def _copy_tbps(device) -> float:
    src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB, many times the L2
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / bench_ms(lambda: dst.copy_(src), device) / 1e9


def ceilings(device, smoke: bool) -> dict:
    if device.type != "cuda":
        return {}
    out = {"copy_TBps": _copy_tbps(device)}
    s = 8192
    x = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    y = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    out["bf16_TFLOPS"] = 2 * s ** 3 / bench_ms(lambda: torch.mm(x, y), device) / 1e9
    xi = torch.randint(-127, 128, (s, s), device=device, dtype=torch.int8)
    yi = torch.randint(-127, 128, (s, s), device=device, dtype=torch.int8).t()
    out["int8_TOPS"] = 2 * s ** 3 / bench_ms(lambda: torch._int_mm(xi, yi), device) / 1e9
    return out


# ---------------------------------------------------------------- 2. checks
class ForceConfig:
    """Replace the tuner in the kernel modules so each call takes config ``i`` of the list it is offered."""

    def __init__(self, i: int):
        self.i, self.max_len = i, 0

    def __call__(self, key, configs, run):
        self.max_len = max(self.max_len, len(configs))
        return configs[min(self.i, len(configs) - 1)]


def run_checks(device, smoke: bool) -> bool:
    from fxopt.kernels import triton_int8, triton_sparse, triton_wq
    mods = (triton_int8, triton_sparse, triton_wq)
    saved = [m.autotune for m in mods]
    # (M, N, K, dtypes, every config?): every config at three shapes in bf16 (the int8 GEMMs do not depend on
    # the activation dtype past quantization), the first config of each list in fp16 and fp32
    if smoke:
        shapes = [(1, 40, 64, (torch.float32,), True), (17, 24, 128, (torch.float32, torch.float16), True)]
    else:
        bf = (torch.bfloat16,)
        shapes = [(1, 4000, 4096, bf, True), (77, 1000, 1024, bf, True), (1000, 4096, 4096, bf, True),
                  (5, 1000, 1024, (torch.float16, torch.float32), False),
                  (300, 1024, 512, (torch.float16, torch.float32), False)]
    ok = True
    g = torch.Generator(device=device).manual_seed(1)
    for m, n, k, dtypes, every in shapes:
        w = torch.randn(n, k, generator=g, device=device) * 0.05
        bias = torch.randn(n, generator=g, device=device)
        ops = op_table(w, bias, 0.3)
        for dtype in dtypes:
            x = (torch.randn(m, k, generator=g, device=device) * 2).to(dtype)
            for name, (fn, ref, _, _) in ops.items():
                want = ref(x)
                worst, runs = 0.0, 0
                for plan in plan_choices(name):
                    i = 0
                    while True:  # every config the op can be offered at this shape
                        forced = ForceConfig(i)
                        for mod in mods:
                            mod.autotune = forced
                        try:
                            out = fn(x, plan)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                        except Exception as e:
                            RESULTS["errors"].append(f"check {name} {plan} cfg{i} {m}x{n}x{k} {dtype}: {e!r}"[:500])
                            out = None
                        finally:
                            for mod, a in zip(mods, saved):
                                mod.autotune = a
                        e = rel_err(out, want) if out is not None else float("nan")
                        worst = e if math.isnan(e) or math.isnan(worst) else max(worst, e)
                        runs += 1
                        i += 1
                        if not every or i >= max(1, forced.max_len):
                            break
                passed = not math.isnan(worst) and worst <= TOL[dtype]
                ok &= passed
                RESULTS["checks"].append({"op": name, "shape": f"{m}x{n}x{k}", "dtype": str(dtype)[6:],
                                          "runs": runs, "worst rel": f"{worst:.2e}", "ok": "yes" if passed else "NO"})
        if elapsed() > ARGS.budget * 0.3:
            log("checks: time budget reached, later shapes skipped")
            RESULTS["errors"].append("checks stopped early by the time budget")
            break
    return ok


# ---------------------------------------------------------------- 3. kernel table
def torchao_peers(w: torch.Tensor, bias):
    """torchao's int8-dynamic and int4-weight linears of ``w``, where torchao is installed."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int4WeightOnlyConfig
    except Exception:
        return {}
    peers = {}
    for label, cfg in (("torchao int8-dynamic", Int8DynamicActivationInt8WeightConfig()),
                       ("torchao int4-weight g128", Int4WeightOnlyConfig(group_size=128))):
        try:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if bias is not None:
                    lin.bias.copy_(bias)
            quantize_(lin, cfg)
            peers[label] = lin
        except Exception as e:
            RESULTS["errors"].append(f"{label}: {e!r}"[:300])
    return peers


def run_kernels(device, smoke: bool, ceil: dict):
    sizes = [64] if smoke else [4096, 8192]
    ms_list = [1, 16, 33] if smoke else [1, 16, 128, 4096]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(2)
    peak_c = {"float": ceil.get("bf16_TFLOPS"), "int8": ceil.get("int8_TOPS")}
    bw = ceil.get("copy_TBps")
    for size in sizes:
        w = (torch.randn(size, size, generator=g, device=device) * 0.02).to(dtype)
        bias = None
        ops = op_table(w, bias, 0.1)
        q8, _ = quant_int8(w)
        w24 = prune_24(w)
        semi = None
        if device.type == "cuda":
            try:
                from torch.sparse import to_sparse_semi_structured
                semi = to_sparse_semi_structured(w24)
            except Exception as e:
                RESULTS["errors"].append(f"torch 2:4: {e!r}"[:300])
        peers = torchao_peers(w, bias) if device.type == "cuda" else {}
        for m in ms_list:
            if elapsed() > ARGS.budget * 0.65:
                RESULTS["errors"].append(f"kernel table stopped early by the time budget at N=K={size}, M={m}")
                log("kernels: time budget reached")
                return
            x = torch.randn(m, size, generator=g, device=device).to(dtype)
            rows = {"bf16 F.linear (cuBLAS)": (lambda: F.linear(x, w), size * size * w.element_size(), False, None)}
            if m > 16:
                xq = torch.randint(-127, 128, (m, size), device=device, dtype=torch.int8)
                rows["torch._int_mm (GEMM only)"] = (lambda: torch._int_mm(xq, q8.t()), size * size, True, None)
            if semi is not None:
                rows["torch 2:4 semi-structured"] = (lambda: F.linear(x, semi), size * size * w.element_size() // 2
                                                     + size * size // 8, False, None)
            for label, lin in peers.items():
                rows[label] = (lambda lin=lin: lin(x), None, label.startswith("torchao int8"), None)
            for name, (fn, ref, wbytes, int8) in ops.items():
                for plan in plan_choices(name):
                    if plan == "int_mm" and m <= 16:
                        continue
                    rows[f"fxopt {name}" + ("" if plan == "triton" else f" [{plan}]")] = (
                        (lambda fn=fn, plan=plan: fn(x, plan)), wbytes, int8, (fn, ref, plan))
            base = None
            with torch.no_grad():
                for label, (call, wbytes, int8, check) in rows.items():
                    try:
                        err = ""
                        if check is not None:
                            e = rel_err(check[0](x, check[2]), check[1](x))
                            err = f"{e:.1e}"
                        ms = bench_ms(call, device)
                    except Exception as e:
                        RESULTS["errors"].append(f"kernel {label} M={m} N=K={size}: {e!r}"[:400])
                        continue
                    flops = 2 * m * size * size
                    io = (wbytes or 0) + m * size * x.element_size() + m * size * 4
                    tf, gbs = flops / ms / 1e9, io / ms / 1e6
                    pc = peak_c["int8" if int8 else "float"]
                    frac = max(tf / pc if pc else 0, gbs / 1e3 / bw if bw else 0)
                    base = ms if label.startswith("bf16 F.linear") else base
                    RESULTS["kernels"].append({
                        "N=K": size, "M": m, "kernel": label, "ms": f"{ms:.4f}", "TFLOPS": f"{tf:.1f}",
                        "GB/s": f"{gbs:.0f}" if wbytes else "", "of ceiling": f"{frac:.0%}" if (pc or bw) else "",
                        "vs bf16": f"{base / ms:.2f}x" if base else "", "rel err": err})
        log(f"kernels: N=K={size} done")
        dump()


# ---------------------------------------------------------------- 4. end to end
def build_models(device, smoke: bool):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if smoke:
        bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=100))
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        shapes = {"bert": (2, 8), "prefill": (1, 16), "decode": (1, 1)}
    else:
        bert = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                    intermediate_size=1536, vocab_size=30522))
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                             max_position_embeddings=4096))
        shapes = {"bert": (32, 128), "prefill": (1, 2048), "decode": (1, 1)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for mdl in (bert, llama):
        mdl.config.use_cache = False
        mdl.eval().to(device=device, dtype=dtype)
    return bert, llama, shapes


class LastHidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        out = self.m(input_ids=input_ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


E2E_RECIPES = [("int8-dynamic", "int8-dynamic"), ("int8-weight", "int8-weight"), ("int4-weight", "int4-weight"),
               ("2:4", "sparse-2:4,lower-sparse")]


def run_e2e(device, smoke: bool):
    import fxopt
    bert, llama, shapes = build_models(device, smoke)
    cases = [("MiniLM-L6 (BERT 384)", LastHidden(bert), shapes["bert"], 30000 if not smoke else 100),
             ("Llama 1.1B prefill", LastHidden(llama), shapes["prefill"], 32000 if not smoke else 100),
             ("Llama 1.1B decode step", LastHidden(llama), shapes["decode"], 32000 if not smoke else 100)]
    for label, model, (b, t), vocab in cases:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
        with torch.no_grad():
            ref = model(ids)
            ref_dtype, ref = ref.dtype, ref.float()
            eager_ms = bench_ms(lambda: model(ids), device)
        RESULTS["e2e"].append({"model": label, "variant": f"eager {str(ref_dtype)[6:]}", "ms": f"{eager_ms:.3f}", "vs eager": "1.00x",
                               "cos": "1.0000", "build s": ""})
        variants = []
        if device.type == "cuda":
            variants.append(("torch.compile", lambda: torch.compile(model)))
        for name, recipe in E2E_RECIPES:
            def build(recipe=recipe, ids=ids):
                return fxopt.compile(model, (ids,), recipe=recipe, progress=False)
            variants.append((f"fxopt {name}", build))
        for vname, build in variants:
            if elapsed() > ARGS.budget:
                RESULTS["errors"].append(f"e2e stopped early by the time budget at {label} {vname}")
                log("e2e: time budget reached")
                return
            try:
                t = time.perf_counter()
                mod = build()
                with torch.no_grad():
                    out = mod(ids)
                    out = out.float() if isinstance(out, torch.Tensor) else out[0].float()
                    build_s = time.perf_counter() - t
                    ms = bench_ms(lambda: mod(ids), device)
                cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
                lowered = ""
                hist = getattr(mod, "fxopt_history", None)
                if hist is not None:
                    ops = [str(n.target) for n in mod.graph.nodes if n.op == "call_function"
                           and str(n.target).startswith("fxopt.")]
                    lowered = f"{len(ops)} fxopt ops"
                RESULTS["e2e"].append({"model": label, "variant": vname, "ms": f"{ms:.3f}",
                                       "vs eager": f"{eager_ms / ms:.2f}x", "cos": f"{cos:.4f}",
                                       "build s": f"{build_s:.0f}", "lowered": lowered})
                dump()
            except Exception as e:
                RESULTS["errors"].append(f"e2e {label} {vname}: {e!r}"[:600])
                log(f"e2e {label} {vname} failed: {e!r}"[:300])
        log(f"e2e: {label} done")


# ---------------------------------------------------------------- main
def dump() -> None:
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        with open(os.path.join(ARGS.out, "gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on a CPU machine under Triton's interpreter")
    p.add_argument("--skip-e2e", action="store_true", help="the checks and the kernel table only")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sections are cut short past it")
    p.add_argument("--out", default=None, help="write gpu.json (every number) into this folder")
    ARGS = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not ARGS.smoke:
        p.error("no CUDA device here: run with --smoke (tiny shapes under Triton's interpreter)")
    import fxopt.kernels.triton_int8  # noqa: F401  (registers the ops)
    from fxopt.kernels.triton_common import HAS_TRITON, INTERPRET
    if not HAS_TRITON:
        p.error("Triton is not installed: pip install 'fxopt[gpu]'")
    import triton
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor()}), "
            f"Triton interpreter={INTERPRET}", "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        info["SMs"] = torch.cuda.get_device_properties(0).multi_processor_count
    RESULTS["device"] = info
    log("device:", info)
    ok = True
    try:
        RESULTS["ceilings"] = ceil = ceilings(device, ARGS.smoke)
        log("ceilings:", {k: round(v, 2) for k, v in ceil.items()})
    except Exception as e:
        ceil = {}
        RESULTS["errors"].append(f"ceilings: {e!r}")
    sections = [("checks", lambda: run_checks(device, ARGS.smoke), ARGS.skip_checks),
                ("kernels", lambda: run_kernels(device, ARGS.smoke, ceil), False),
                ("e2e", lambda: run_e2e(device, ARGS.smoke), ARGS.skip_e2e)]
    for name, fn, skip in sections:
        if skip:
            continue
        try:
            r = fn()
            dump()
            if name == "checks":
                ok &= bool(r)
                log(f"checks: {'all passed' if r else 'FAILURES'} ({len(RESULTS['checks'])} op x shape x dtype)")
        except Exception:
            ok = False
            RESULTS["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            log(f"{name} failed:\n{traceback.format_exc()[-1500:]}")
    dump()
    failed = [c for c in RESULTS["checks"] if c["ok"] != "yes"]
    print(f"\n== {info['device']}, torch {info['torch']}, Triton {info['triton']}")
    if RESULTS.get("ceilings"):
        print("ceilings measured here: " + ", ".join(f"{k} {v:.1f}" for k, v in RESULTS["ceilings"].items()))
    print(f"\nchecks: {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} passed")
    if failed:
        print(table(failed))
    if RESULTS["kernels"]:
        print("\nkernels (bf16 activations; ms = median of do_bench with the L2 flushed):")
        print(table(RESULTS["kernels"]))
    if RESULTS["e2e"]:
        print("\nend to end (seeded random weights, bf16):")
        rows = [{**r, "lowered": r.get("lowered", "")} for r in RESULTS["e2e"]]
        print(table(rows))
    if RESULTS["errors"]:
        print("\nerrors:\n" + "\n".join(RESULTS["errors"]))
    print(f"\ntotal {elapsed():.0f} s")
    return 0 if ok else 1


ARGS = None
if __name__ == "__main__":
    sys.exit(main())

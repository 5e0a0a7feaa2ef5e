"""fxopt: a model-optimization compiler for PyTorch.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> fast = fxopt.compile(model, (torch.randn(2, 8),))
    >>> print(fast.fxopt_history.pipeline)
    canonicalize,fold-bn,fuse-attention,simplify-activations,cleanup

Entry points: :func:`compile`, :func:`trace`, :class:`PassManager`, :class:`Pass`,
:func:`graph_pass`, :func:`save`, :func:`load`, ``torch.compile(m, backend="fxopt")``.

``import fxopt`` is cheap (it does not import torch): the library loads on the first use
of any of its names, so ``fxopt --help`` and scripts that only handle errors start at once.
"""
from __future__ import annotations

__version__ = "0.1.0"

from fxopt.errors import (CalibrationError, FxoptError, InputError, LoadError, PassError, PipelineError,  # noqa: E402
                     RecipeError, TraceError, ExportError, RuntimeUnavailable)

#: public name -> the submodule that defines it (loaded on first use)
_EXPORTS = {
    **{n: ".passmgr.pass_base" for n in ("ALL", "EXACT", "Pass", "PassContext", "PassResult", "Tolerance", "get_pass",
                                  "graph_pass", "list_passes", "register_pass")},
    **{n: ".passmgr.analysis" for n in ("Analysis", "AnalysisManager", "get_analysis", "list_analyses",
                                 "register_analysis")},
    **{n: ".passmgr.pipeline" for n in ("Pipeline", "Repeat", "parse_pipeline", "register_pipeline")},
    **{n: ".passmgr.manager" for n in ("History", "Instrument", "PassManager", "PassRecord", "PrintBeforeAfter",
                                "TimingReport")},
    **{n: ".passmgr.instruments" for n in ("CrashReproducer", "Disable", "StopAfter")},
    "trace": ".ir.capture", "Recipe": ".passmgr.recipes", "recipes": ".passmgr.recipes", "register_recipe": ".passmgr.recipes",
    "compile": ".api", "load": ".archive.serialize", "save": ".archive.serialize", "Backend": ".backend", "summary": ".viz.summarize",
    "calibrate": ".quant.calibrate", "SensitivityReport": ".quant.sensitivity", "sensitivity": ".quant.sensitivity",
    "QSpec": ".quant.qspec", "register_channel_rule": ".passes.analysis.dependency",
    "ChannelRule": ".passes.analysis.channel_rules", "diff": ".viz.graph_diff",
    "render": ".viz.graph_render", "export_onnx": ".runtime.onnx_export", "RuntimeModule": ".runtime.engines",
    "list_runtimes": ".runtime.engines",
    **{n: ".train.training" for n in ("FinetuneHistory", "cubic_sparsity", "finetune", "gradual_prune")},
    "qat": ".train.qat", "transfer": ".train.transfer", "rebatch_by_length": ".train.batching",
    **{n: ".passmgr.patterns" for n in ("Match", "Rewrite", "RewritePass", "RewriteSet", "register_rewrites")},
}
_LOADED = False


def _load() -> None:
    """Import the library: the built-in passes, analyses, recipes and the torch.compile backend."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import fxopt.passes  # noqa: F401  (registers the built-in passes and analyses)
    from fxopt.passmgr.recipes import _builtin
    from fxopt.backend import _register
    _builtin()
    _register()
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(module, __name__), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'fxopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "compile", "trace", "save", "load", "summary", "diff", "render", "finetune", "gradual_prune", "qat", "transfer", "rebatch_by_length", "FinetuneHistory", "cubic_sparsity",
    "Rewrite", "RewriteSet", "RewritePass", "Match", "register_rewrites", "recipes", "Recipe", "register_recipe",
    "Pass", "PassResult", "PassContext", "Tolerance", "EXACT", "ALL", "graph_pass", "register_pass",
    "get_pass", "list_passes", "Analysis", "AnalysisManager", "register_analysis", "get_analysis",
    "list_analyses", "Pipeline", "Repeat", "parse_pipeline", "register_pipeline",
    "PassManager", "PassRecord", "History", "Instrument", "PrintBeforeAfter", "TimingReport", "Backend",
    "CrashReproducer", "Disable", "StopAfter", "ChannelRule",
    "FxoptError", "TraceError", "PassError", "PipelineError", "RecipeError", "InputError", "LoadError",
    "CalibrationError", "ExportError", "RuntimeUnavailable", "export_onnx", "RuntimeModule", "list_runtimes",
    "calibrate", "sensitivity", "SensitivityReport", "QSpec", "register_channel_rule", "__version__",
]

"""fxopt: a model-optimization compiler for PyTorch.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> fast = fxopt.compile(model, (torch.randn(2, 8),))
    >>> print(fast.fxopt_history.pipeline)
    canonicalize,fold-bn,fuse-attention,simplify-activations,cleanup

Entry points: :func:`compile`, :func:`trace`, :class:`PassManager`, :class:`Pass`,
:func:`graph_pass`, :func:`save`, :func:`load`, ``torch.compile(m, backend="fxopt")``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (CalibrationError, FxoptError, InputError, LoadError, PassError, PipelineError,  # noqa: E402
                     RecipeError, TraceError)
from .pass_base import (ALL, EXACT, Pass, PassContext, PassResult, Tolerance, get_pass, graph_pass,  # noqa: E402
                        list_passes, register_pass)
from .analysis import Analysis, AnalysisManager, get_analysis, list_analyses, register_analysis  # noqa: E402
from .pipeline import Pipeline, Repeat, parse_pipeline, register_pipeline  # noqa: E402
from .manager import History, Instrument, PassManager, PassRecord, PrintBeforeAfter, TimingReport  # noqa: E402
from .capture import trace  # noqa: E402
from .recipes import Recipe, recipes, register_recipe  # noqa: E402
from . import passes  # noqa: E402,F401  (registers the built-in passes and analyses)
from .recipes import _builtin as _builtin_recipes  # noqa: E402
from .api import compile  # noqa: E402
from .serialize import load, save  # noqa: E402
from .backend import Backend, _register as _register_backend  # noqa: E402
from .summarize import summary  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .sensitivity import SensitivityReport, sensitivity  # noqa: E402
from .qspec import QSpec  # noqa: E402
from .passes.dependency import register_channel_rule  # noqa: E402
from .graph_diff import diff  # noqa: E402
from .graph_render import render  # noqa: E402
from .training import FinetuneHistory, cubic_sparsity, finetune, gradual_prune  # noqa: E402
from .patterns import Match, Rewrite, RewritePass, RewriteSet, register_rewrites  # noqa: E402

_builtin_recipes()
_register_backend()

__all__ = [
    "compile", "trace", "save", "load", "summary", "diff", "render", "finetune", "gradual_prune", "FinetuneHistory", "cubic_sparsity",
    "Rewrite", "RewriteSet", "RewritePass", "Match", "register_rewrites", "recipes", "Recipe", "register_recipe",
    "Pass", "PassResult", "PassContext", "Tolerance", "EXACT", "ALL", "graph_pass", "register_pass",
    "get_pass", "list_passes", "Analysis", "AnalysisManager", "register_analysis", "get_analysis",
    "list_analyses", "Pipeline", "Repeat", "parse_pipeline", "register_pipeline",
    "PassManager", "PassRecord", "History", "Instrument", "PrintBeforeAfter", "TimingReport", "Backend",
    "FxoptError", "TraceError", "PassError", "PipelineError", "RecipeError", "InputError", "LoadError",
    "CalibrationError", "calibrate", "sensitivity", "SensitivityReport", "QSpec", "register_channel_rule", "__version__",
]

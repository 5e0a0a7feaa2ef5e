"""``torch.compile(model, backend="fxopt")``: partial capture through Dynamo.

Dynamo splits a model around code a single graph cannot hold (data-dependent
``if``, printing, unsupported Python) and hands each captured piece to this
backend, which runs an fxopt recipe on it. ``fxopt.trace`` rejects such
models; this path optimizes every piece it can.

Options: ``torch.compile(m, backend="fxopt", options={"recipe": "default"})``,
or an instance that remembers what it did::

    >>> import torch, fxopt
    >>> backend = fxopt.Backend(recipe="default")
    >>> f = torch.compile(torch.nn.Linear(4, 4), backend=backend)
    >>> _ = f(torch.randn(2, 4))
    >>> len(backend.histories)
    1
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from fxopt.errors import FxoptError, PipelineError, RecipeError

__all__ = ["Backend", "fxopt_backend"]


class Backend:
    """A Dynamo backend that compiles every captured graph with ``fxopt.compile``.

    ``histories`` collects the run history of each graph; ``fallbacks`` the
    graphs left unoptimized with the reason (symbolic sizes, a capture error).
    """

    def __init__(self, recipe: Any = "default", **compile_options: Any):
        from fxopt.api import resolve_recipe
        resolve_recipe(recipe)  # a typo is the user's mistake: a RecipeError now, not a warning per graph
        self.recipe = recipe
        self.compile_options = compile_options
        self.histories: list = []
        self.fallbacks: list[str] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        options = dict(self.compile_options)
        options.update(kwargs.get("options") or {})
        recipe = options.pop("recipe", self.recipe)
        from fxopt.api import compile as fxopt_compile
        from fxopt.api import resolve_recipe
        resolve_recipe(recipe)  # raises RecipeError (Dynamo reports it) instead of silently running eager
        inputs = []
        for x in example_inputs:
            if not isinstance(x, torch.Tensor):
                self.fallbacks.append(f"graph with a non-tensor input ({type(x).__name__}: {x}); "
                                      f"use torch.compile(..., dynamic=False)\n{gm.code}")
                return gm.forward
            if isinstance(x, torch._subclasses.FakeTensor):
                if any(isinstance(s, torch.SymInt) for s in x.shape):
                    self.fallbacks.append("graph with symbolic sizes; use torch.compile(..., dynamic=False)")
                    return gm.forward
                x = torch.randn(x.shape, dtype=x.dtype) if x.is_floating_point() else \
                    torch.zeros(x.shape, dtype=x.dtype)
            inputs.append(x.detach())
        try:
            compiled = fxopt_compile(gm, tuple(inputs), recipe=recipe, dynamic=False, **options)
        except (RecipeError, PipelineError):
            raise
        except FxoptError as e:
            self.fallbacks.append(str(e).splitlines()[0])
            warnings.warn(f"fxopt backend: leaving a graph unoptimized: {str(e).splitlines()[0]}", stacklevel=2)
            return gm.forward
        self.histories.append(compiled.fxopt_history)
        return compiled


#: the instance behind ``backend="fxopt"``; its ``histories`` show what was compiled (made without the
#: recipe check: the recipes register after this module is imported)
fxopt_backend = Backend.__new__(Backend)
fxopt_backend.recipe, fxopt_backend.compile_options, fxopt_backend.histories, fxopt_backend.fallbacks = \
    "default", {}, [], []


def _register() -> None:
    from torch._dynamo import list_backends, register_backend
    if "fxopt" not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=fxopt_backend, name="fxopt")

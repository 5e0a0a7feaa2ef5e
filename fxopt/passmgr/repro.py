"""Rerun a crash reproducer (:class:`~fxopt.passmgr.instruments.CrashReproducer`).

``rerun(directory)`` loads the graph saved before the failing pass (:func:`fxopt.load`: nothing
in it is executed), the inputs (``torch.load(weights_only=True)``: tensors only), the options,
and runs the failing pass on them with ``strict=True``, so its error is raised again::

    fxopt.compile(model, args, recipe=..., reproducer="crash/")   # a pass fails
    fxopt repro crash/                                          # the same PassError, in seconds

Passes registered by your own code must be registered in the rerunning process too
(``fxopt repro DIR --import mypackage.passes``).
"""
from __future__ import annotations

import json
import os
from typing import Any

from fxopt.errors import InputError, LoadError

__all__ = ["rerun", "read_reproducer"]


def read_reproducer(directory: str | os.PathLike) -> tuple[Any, str, tuple, dict, dict]:
    """``(graph module, pipeline text, args, kwargs, options)`` of a reproducer directory."""
    import torch
    from fxopt.archive.serialize import load
    from fxopt.passmgr.instruments import REPRO_GRAPH, REPRO_INPUTS, REPRO_OPTIONS, REPRO_PIPELINE
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise InputError(f"{d} is not a directory; pass the directory given as compile(..., reproducer=DIR)")
    path = lambda name: os.path.join(d, name)  # noqa: E731
    for name in (REPRO_GRAPH, REPRO_PIPELINE):
        if not os.path.exists(path(name)):
            raise LoadError(f"{d} holds no {name}: not a complete fxopt crash reproducer"
                            + (" (its graph could not be saved; see README.txt)" if name == REPRO_GRAPH else ""))
    gm = load(path(REPRO_GRAPH))
    with open(path(REPRO_PIPELINE)) as f:
        pipeline = f.read().strip()
    args, kwargs = (), {}
    if os.path.exists(path(REPRO_INPUTS)):
        try:
            inputs = torch.load(path(REPRO_INPUTS), weights_only=True)  # tensors and containers only
        except Exception as e:  # noqa: BLE001 - a crafted or damaged file is refused, never run
            raise LoadError(f"{path(REPRO_INPUTS)} is not a file of tensors fxopt wrote ({type(e).__name__}: "
                            f"{str(e)[:200]}); it was not loaded") from e
        if not isinstance(inputs, dict) or not isinstance(inputs.get("args"), (tuple, list)) or \
                not isinstance(inputs.get("kwargs"), dict):
            raise LoadError(f"{path(REPRO_INPUTS)} does not hold {{'args': (...), 'kwargs': {{...}}}}")
        args, kwargs = tuple(inputs["args"]), dict(inputs["kwargs"])
    options: dict = {}
    if os.path.exists(path(REPRO_OPTIONS)):
        try:
            with open(path(REPRO_OPTIONS)) as f:
                options = json.load(f)
        except ValueError as e:
            raise LoadError(f"{path(REPRO_OPTIONS)} is not JSON: {e}") from e
        if not isinstance(options, dict):
            raise LoadError(f"{path(REPRO_OPTIONS)} must hold a JSON object")
    return gm, pipeline, args, kwargs, options


def rerun(directory: str | os.PathLike, strict: bool = True) -> Any:
    """Run the reproducer's pass on its graph and inputs; returns the manager's result (raises the
    pass's :class:`~fxopt.errors.PassError` again with ``strict=True``)."""
    from fxopt.passmgr.manager import PassManager
    gm, pipeline, args, kwargs, options = read_reproducer(directory)
    return PassManager(pipeline, strict=strict, warn=False).run(gm, args, kwargs, options=options)

"""Capture: ``fxopt.trace`` turns a model into a GraphModule in the canonical dialect.

The front-end is ``torch.export`` (non-strict), followed by
``run_decompositions({})``, which functionalizes the graph (no in-place ops)
while keeping composite ops such as ``linear`` and ``conv2d`` whole. See
``fxopt.dialect`` for what the dialect guarantees. Measured on this kind of
machine: ``symbolic_trace`` fails on Hugging Face BERT, export captures it.

Failures become a :class:`~fxopt.errors.TraceError` that names the module and
source line that could not be captured, the reason and the remedy.
"""
from __future__ import annotations

import contextlib
import copy
import io
import inspect
import linecache
import os
import re
import sys
import time
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from .capture_rewrites import ExportFriendly
from .dialect import op_name
from .errors import InputError, TraceError
from .rewrite_utils import unpack_split_params

__all__ = ["trace", "normalize_inputs", "dynamic_shapes_for"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXOPT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalize_inputs(args: Any = (), kwargs: dict | None = None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of inputs, or ``None`` for ``args``; a dict for kwargs."""
    if args is None:
        args = ()
    elif isinstance(args, torch.Tensor) or not isinstance(args, (tuple, list)):
        args = (args,)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise InputError(f"kwargs must be a dict of keyword inputs, got {type(kwargs).__name__}; "
                         "pass keyword inputs as kwargs={'input_ids': ids, ...}")
    return tuple(args), dict(kwargs)


def _check_finite(args: tuple, kwargs: dict) -> None:
    for where, value in list(enumerate(args)) + list(kwargs.items()):
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
                name = f"args[{where}]" if isinstance(where, int) else f"kwargs['{where}']"
                raise InputError(f"example input {name} contains NaN or Inf; fxopt verifies every pass "
                                 "by running the model on the example inputs, so give finite values")


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    """Translate ``dynamic`` into a ``torch.export`` ``dynamic_shapes`` spec.

    * ``None`` or ``"batch"``: dimension 0 of every tensor input may vary (export
      keeps it static if the model forces it, or if the example size is 0 or 1);
    * ``False``: everything static;
    * ``True``: every dimension of every tensor input may vary (``Dim.AUTO``);
    * anything else is passed to ``torch.export`` unchanged.
    """
    if dynamic is False:
        return None
    if not (dynamic is None or dynamic is True or dynamic == "batch"):
        return dynamic

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {d: Dim.AUTO for d in (range(x.dim()) if dynamic is True else [0])}
        return None

    def tree_spec(value: Any) -> Any:
        return torch.utils._pytree.tree_map(spec, value)

    if not kwargs:
        return tuple(tree_spec(a) for a in args)
    # with keyword inputs torch.export wants specs by parameter name
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(args):
        return None  # *args signature: fall back to static shapes
    out = {p.name: tree_spec(a) for p, a in zip(params, args)}
    out.update({k: tree_spec(v) for k, v in kwargs.items()})
    return out


_REMEDY_CONTROL_FLOW = (
    "the model branches on tensor values, which a single graph cannot express. Either "
    "rewrite the branch with torch.cond / torch.where, move it out of forward, or use "
    "torch.compile(model, backend='fxopt'), which splits the graph around such code and "
    "optimizes every captured piece")
_REMEDY_DYNAMIC = (
    "the model fixes a dimension that was declared dynamic. Pass dynamic=False "
    "(static shapes), or a torch.export dynamic_shapes spec that marks only the "
    "dimensions that really vary")
_REMEDY_GENERIC = (
    "check that the model runs eagerly on these inputs; if it does, the failing code is "
    "not traceable by torch.export: rewrite it with torch ops, or use "
    "torch.compile(model, backend='fxopt') for partial capture")


def _user_frame(exc: BaseException, model: torch.nn.Module) -> tuple[str | None, str | None, str | None]:
    """Find (module path, file:line, source) of the user's code where capture failed."""
    paths = {id(m): name for name, m in model.named_modules()}
    module = None
    location = source = None
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    # torch.export records the user frame in the message ("The following call raised this error")
    for frame, lineno in frames:
        fname = frame.f_code.co_filename
        self_obj = frame.f_locals.get("self")
        if isinstance(self_obj, torch.nn.Module) and id(self_obj) in paths and \
                frame.f_code.co_name in ("_call_impl", "_wrapped_call_impl", "forward"):
            module = paths[id(self_obj)]
        user_code = not fname.startswith(_TORCH_DIR) and not fname.startswith(_FXOPT_DIR) \
            and not fname.startswith("<")
        if user_code and frame.f_code.co_name != "<module>":
            location = f"{fname}:{lineno}"
            source = linecache.getline(fname, lineno)
            # the module whose forward this is, if it is a method of one
            args = frame.f_code.co_varnames[:1]
            if args:
                first = frame.f_locals.get(args[0])
                if isinstance(first, torch.nn.Module) and id(first) in paths:
                    module = paths[id(first)]
    if location is None:
        m = re.search(r'File "([^"]+)", line (\d+)', str(exc))
        if m:
            location = f"{m.group(1)}:{m.group(2)}"
            source = linecache.getline(m.group(1), int(m.group(2)))
    return module, location, source


def _reason(exc: BaseException) -> tuple[str, str]:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    name = type(exc).__name__
    low = text.lower()
    if "data-dependent" in low or "data dependent" in low or name == "GuardOnDataDependentSymNode":
        return f"control flow depends on tensor values ({first})", _REMEDY_CONTROL_FLOW
    if "constraint" in low and ("violat" in low or "specializ" in low):
        return f"dynamic dimension was specialized ({first})", _REMEDY_DYNAMIC
    return f"{name}: {first}", _REMEDY_GENERIC


def _readable_names(gm: fx.GraphModule) -> None:
    """Rename compute nodes after their module path: ``layer1_0_conv1_conv2d``."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        from .dialect import module_path
        mp = module_path(node)
        base = op_name(node)
        if base == "getitem":
            src = node.args[0]
            base = f"{src.name}_{node.args[1]}" if isinstance(src, fx.Node) else base
            candidate = base
        else:
            candidate = f"{mp.replace('.', '_')}_{base}" if mp else base
        candidate = re.sub(r"[^0-9a-zA-Z_]", "_", candidate).lower()
        if candidate and candidate != node.name:
            node._rename(candidate)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dyn: Any) -> Any:
    """torch.export, then functionalize. Sizes of 1 in dynamic dimensions are not
    specialized (``backed_size_oblivious``) so a batch-1 example still gives a
    batch-polymorphic graph; if that setting trips the model, export again without it.
    Library calls that would pin the batch size run as their export-friendly
    equivalents (:mod:`fxopt.capture_rewrites`)."""
    if dyn is not None:
        try:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True), ExportFriendly():
                return torch.export.export(model, args, kwargs, dynamic_shapes=dyn,
                                           strict=False).run_decompositions({})
        except Exception:  # noqa: BLE001 - retried below; that error is the one reported
            pass
    with ExportFriendly():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False).run_decompositions({})


class InputGuard(torch.nn.Module):
    """Wraps export's shape guard so a call with the wrong shapes says what to do."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        try:
            return self.inner(*args)
        except AssertionError as e:
            raise InputError(f"the inputs do not match the shapes this module was compiled for ({e}); "
                             "compile again with dynamic=True (every dimension symbolic), a torch.export "
                             "dynamic_shapes spec, or example inputs of this shape") from e


def install_input_guard(gm: fx.GraphModule) -> None:
    from .dialect import GUARD_MODULE
    inner = getattr(gm, GUARD_MODULE, None)
    if isinstance(inner, torch.nn.Module) and not isinstance(inner, InputGuard):
        setattr(gm, GUARD_MODULE, InputGuard(inner))


def trace(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None, dynamic: Any = None,
          *, copy_model: bool = True) -> fx.GraphModule:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into the canonical dialect.

    Returns a ``GraphModule`` called exactly like the model (same positional and
    keyword inputs, same output structure: tuples, dicts, Hugging Face
    ``ModelOutput`` objects). ``dynamic`` is explained in :func:`dynamic_shapes_for`;
    by default the batch dimension is a symbol.

    The model is deep-copied first (``copy_model=False`` skips that), so the
    returned module never shares parameters with the model you passed.

    Example::

        >>> import torch, fxopt
        >>> gm = fxopt.trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> [n.op for n in gm.graph.nodes if n.op == "call_function"]
        ['call_function']
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxopt.trace expects a torch.nn.Module, got {type(model).__name__}; "
                         "wrap a function in a Module whose forward calls it")
    args, kwargs = normalize_inputs(args, kwargs)
    if copy_model:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise InputError(f"cannot copy the model ({type(e).__name__}: {e}); fxopt copies the model "
                             "so that yours is never changed; make it deep-copyable or pass "
                             "copy_model=False") from e
    # export on copies: it may tag the tensors it sees (dynamic-dim marks), and the user's
    # inputs must come back exactly as they were
    args, kwargs = torch.utils._pytree.tree_map(
        lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    dyn = dynamic_shapes_for(model, args, kwargs, dynamic)
    start = time.perf_counter()
    # torch dumps the partial graph to stderr when export fails; keep that out of the user's
    # terminal (it is in TraceError.details) and replay whatever was printed when it succeeds
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ep = _export(model, args, kwargs, dyn)
    except Exception as e:  # noqa: BLE001 - every capture failure becomes a TraceError
        module, location, source = _user_frame(e, model)
        reason, remedy = _reason(e)
        error = TraceError(reason, module=module, location=location, source=source, remedy=remedy)
        error.details = err.getvalue() + out.getvalue()
        raise error from e
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    gm = ep.module()
    install_input_guard(gm)
    unpack_split_params(gm)   # packed Q/K/V weights (nn.MultiheadAttention): one parameter per projection
    _readable_names(gm)
    gm.graph.lint()
    gm.recompile()
    gm.meta["fxopt_example_inputs"] = (args, kwargs)
    gm.meta["fxopt_capture"] = {
        "front_end": "torch.export",
        "seconds": time.perf_counter() - start,
        "dynamic": dynamic,
        "dynamic_shapes": dyn,
        "range_constraints": {str(k): str(v) for k, v in ep.range_constraints.items()},
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    }
    return gm

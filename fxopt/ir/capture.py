"""Capture: ``fxopt.trace`` turns a model into a GraphModule in the canonical dialect.

The front-end is ``torch.export`` (non-strict), followed by
``run_decompositions({})``, which functionalizes the graph (no in-place ops)
while keeping composite ops such as ``linear`` and ``conv2d`` whole. See
``fxopt.ir.dialect`` for what the dialect guarantees. Measured on this kind of
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

from fxopt.ir.capture_rewrites import ExportFriendly, stride_safe_views
from fxopt.ir.dialect import op_name
from fxopt.errors import InputError, TraceError
from fxopt.ir.torch_compat import torch_internals
from fxopt.ir.input_guard import SIGNATURE_KEY, InputGuard, install_input_guard
from fxopt.ir.graph_utils import hf_cache_bases
from fxopt.ir.rewrite_utils import unpack_split_params

__all__ = ["trace", "normalize_inputs", "dynamic_shapes_for", "check_materialized", "TOKEN_INPUTS",
           "InputGuard", "install_input_guard"]

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



def example_call(gm: torch.nn.Module, example_inputs: Any = None, who: str = "this") -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``gm`` with: ``example_inputs`` (``(args, kwargs)``, a tuple of inputs or a
    tensor), else the example inputs fxopt captured it with; ``who`` names the caller in the error
    (``fxopt.save``, ``fxopt.export_onnx``) for a module fxopt did not capture."""
    if example_inputs is None:
        example_inputs = getattr(gm, "meta", {}).get("fxopt_example_inputs")
    if example_inputs is None:
        raise InputError(f"{who} needs example inputs for a module that fxopt did not capture: "
                         f"{who}(module, path, example_inputs=((x,), {{}}))")
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        return normalize_inputs(*example_inputs)
    return normalize_inputs(example_inputs)

def _check_finite(args: tuple, kwargs: dict) -> None:
    for where, value in list(enumerate(args)) + list(kwargs.items()):
        name = f"args[{where}]" if isinstance(where, int) else f"kwargs['{where}']"
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
                raise InputError(f"example input {name} is on the meta device: it has no values, and fxopt "
                                 "verifies every pass by running the model on the example inputs. Give real "
                                 "tensors; if the model was built on the meta device too, materialize its "
                                 "weights first (model.to_empty(device='cpu'), then model.load_state_dict(...))")
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
                raise InputError(f"example input {name} contains NaN or Inf; fxopt verifies every pass "
                                 "by running the model on the example inputs, so give finite values")


def check_materialized(model: torch.nn.Module) -> None:
    """Raise :class:`InputError` if ``model`` has parameters or buffers on the meta device.

    ``fxopt.trace`` calls it unless every example input is on the meta device too
    (a capture of the graph's structure only)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.device.type == "meta":
                raise InputError(f"the model's {kind} '{name}' is on the meta device (shapes only, no values); "
                                 "fxopt runs the model to verify every pass, so materialize the weights before "
                                 "compiling: model.to_empty(device='cpu'), then model.load_state_dict(state_dict) "
                                 "(or from_pretrained without device_map='meta')")


#: keyword names of token inputs: their dimension 1 (the sequence) is symbolic by default
TOKEN_INPUTS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "inputs_embeds",
    "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "decoder_inputs_embeds",
    "encoder_attention_mask", "special_tokens_mask", "cache_position",
})


def _positional_names(model: torch.nn.Module) -> list[str] | None:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    """Translate ``dynamic`` into a ``torch.export`` ``dynamic_shapes`` spec.

    * ``None`` (the default): dimension 0 (the batch) of every tensor input may vary,
      and so may the sequence dimension(s) of token inputs (inputs named as in
      :data:`TOKEN_INPUTS`: ``input_ids``, ``attention_mask``, ``token_type_ids``,
      ``position_ids``, ``decoder_input_ids``, ...): dimension 1 of ``[batch, seq]``
      ids and masks and of ``[batch, seq, hidden]`` embeddings, every dimension but
      the first of a larger mask except broadcast dimensions of size 1. Export keeps a
      dimension static if the model forces it (or if the batch example size is 0);
    * ``"batch"``: only dimension 0 of every tensor input may vary;
    * ``False``: everything static;
    * ``True``: every dimension of every tensor input may vary (``Dim.AUTO``);
    * anything else is passed to ``torch.export`` unchanged.

    Example::

        >>> import torch
        >>> spec = dynamic_shapes_for(torch.nn.Identity(), (), {"input_ids": torch.zeros(8, 128)}, None)
        >>> sorted(spec["input_ids"])
        [0, 1]
    """
    if dynamic is False:
        return None
    if not (dynamic is None or dynamic is True or dynamic == "batch"):
        return dynamic

    def dims(x: torch.Tensor, name: str | None) -> list[int]:
        if dynamic is True:
            return list(range(x.dim()))
        if dynamic is None and name in TOKEN_INPUTS and x.dim() >= 2:
            if x.dim() == 2 or name.endswith("inputs_embeds"):
                return [0, 1]
            return [0] + [d for d in range(1, x.dim()) if x.shape[d] != 1]
        return [0]

    def tree_spec(value: Any, name: str | None) -> Any:
        def spec(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                return {d: Dim.AUTO for d in dims(x, name)}
            return None
        return torch.utils._pytree.tree_map(spec, value)

    names = _positional_names(model)
    if not kwargs:
        named = names if names is not None and len(names) >= len(args) else [None] * len(args)
        return tuple(tree_spec(a, n) for a, n in zip(args, named))
    # with keyword inputs torch.export wants specs by parameter name
    if names is None or len(names) < len(args):
        return None  # *args signature: fall back to static shapes
    out = {p: tree_spec(a, p) for p, a in zip(names, args)}
    out.update({k: tree_spec(v, k) for k, v in kwargs.items()})
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
        from fxopt.ir.dialect import module_path
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
    equivalents (:mod:`fxopt.ir.capture_rewrites`)."""
    if dyn is not None:
        try:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True), ExportFriendly():
                return torch.export.export(model, args, kwargs, dynamic_shapes=dyn,
                                           strict=False).run_decompositions({})
        except Exception:  # noqa: BLE001 - retried below; that error is the one reported
            pass
    with ExportFriendly():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False).run_decompositions({})


def _hf_cache_classes(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[type]:
    """Hugging Face cache classes the model may return or take (``DynamicCache``, ...)."""
    if "transformers" not in sys.modules:
        return []
    try:
        from transformers import cache_utils
    except ImportError:
        return []
    base = getattr(cache_utils, "Cache", None)
    if base is None:
        return []
    found = [getattr(cache_utils, n) for n in ("DynamicCache", "EncoderDecoderCache") if hasattr(cache_utils, n)]
    # the caches a library model creates itself, plus those defined next to its modeling code
    seen_modules = set()
    for m in model.modules():
        mod = type(m).__module__
        if mod.startswith("transformers.") and mod not in seen_modules:
            seen_modules.add(mod)
            for obj in vars(sys.modules.get(mod, object())).values():
                if isinstance(obj, type) and obj.__module__ == mod and \
                        (issubclass(obj, base) or obj.__name__.endswith("Cache")):
                    found.append(obj)
    if not seen_modules:
        return []
    found += [type(leaf) for leaf in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(leaf, base)]
    return list(dict.fromkeys(found))


def register_hf_cache_class(module: str, name: str) -> bool:
    """Register ``module.name`` (a transformers cache or cache-layer class) as a pytree, as capture does.

    Used when loading a saved decoder in a fresh process. Only classes deriving from
    transformers' ``Cache`` or its cache layers are registered; returns whether it is now.
    """
    import importlib
    try:
        mod = importlib.import_module(module)
        import transformers  # noqa: F401  (hf_cache_bases looks only when it is loaded)
    except ImportError:
        return False
    cls = getattr(mod, name, None)
    bases = hf_cache_bases()
    if not (isinstance(cls, type) and bases and issubclass(cls, bases)):
        return False
    if cls not in torch.utils._pytree.SUPPORTED_NODES:
        try:
            from transformers.exporters.exporter_dynamo import register_pytree_node
        except ImportError:
            return False
        register_pytree_node(cls)
    return cls in torch.utils._pytree.SUPPORTED_NODES


def register_hf_caches(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> list[type]:
    """Make the Hugging Face cache classes a model returns (``DynamicCache``) pytrees.

    ``torch.export`` needs every output container registered: a decoder called with
    the default ``use_cache=True`` returns a ``DynamicCache``. Registration uses the
    helpers transformers ships for export (``transformers.exporters.exporter_dynamo``,
    else ``integrations.executorch.register_dynamic_cache_export_support``) and
    only for classes that are not registered yet, so a registration of your own wins.
    The registrations are global and stay: the compiled module rebuilds its outputs
    with them. Returns the classes this call registered.
    """
    supported = torch.utils._pytree.SUPPORTED_NODES
    missing = [c for c in _hf_cache_classes(model, args, kwargs or {}) if c not in supported]
    if not missing:
        return []
    try:
        from transformers.exporters.exporter_dynamo import register_pytree_node
    except ImportError:
        register_pytree_node = None
    for cls in missing:
        if register_pytree_node is not None:
            register_pytree_node(cls)
        elif cls.__name__ == "DynamicCache":
            try:
                from transformers.integrations.executorch import register_dynamic_cache_export_support
            except ImportError:
                continue
            register_dynamic_cache_export_support()
    return [c for c in missing if c in supported]


def _signature(model: torch.nn.Module) -> list[tuple[str, bool]]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [(p.name, p.default is None) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def trace(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None, dynamic: Any = None,
          *, copy_model: bool = True) -> fx.GraphModule:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into the canonical dialect.

    Returns a ``GraphModule`` called exactly like the model (same positional and
    keyword inputs, same output structure: tuples, dicts, Hugging Face
    ``ModelOutput`` objects and caches). ``dynamic`` is explained in
    :func:`dynamic_shapes_for`; by default the batch dimension is a symbol, and so is
    the sequence dimension of token inputs (``input_ids``, ``attention_mask``, ...).
    If the model cannot be captured with a symbolic sequence, the batch alone is.
    A call with inputs that do not fit raises :class:`~fxopt.errors.InputError`
    naming the input (:mod:`fxopt.ir.input_guard`).

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
    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.device.type != "meta" for t in leaves):
        check_materialized(model)   # an all-meta capture (graph structure only) is allowed
    if copy_model:
        try:
            with torch_internals():
                model = copy.deepcopy(model)
        except Exception as e:
            raise InputError(f"cannot copy the model ({type(e).__name__}: {e}); fxopt copies the model "
                             "so that yours is never changed; make it deep-copyable or pass "
                             "copy_model=False") from e
    # export on copies: it may tag the tensors it sees (dynamic-dim marks), and the user's
    # inputs must come back exactly as they were
    args, kwargs = torch.utils._pytree.tree_map(
        lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    register_hf_caches(model, args, kwargs)
    dyn = dynamic_shapes_for(model, args, kwargs, dynamic)
    tries = [(dynamic, dyn)]
    if dynamic is None:
        batch_only = dynamic_shapes_for(model, args, kwargs, "batch")
        if batch_only != dyn:
            tries.append(("batch", batch_only))   # token sequence dims that the model cannot keep symbolic
    start = time.perf_counter()
    # torch dumps the partial graph to stderr when export fails; keep that out of the user's
    # terminal (it is in TraceError.details) and replay whatever was printed when it succeeds
    for i, (mode, dyn) in enumerate(tries):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch_internals():
                ep = _export(model, args, kwargs, dyn)
            break
        except Exception as e:  # noqa: BLE001 - every capture failure becomes a TraceError
            reason, remedy = _reason(e)
            if i + 1 < len(tries):
                continue
            module, location, source = _user_frame(e, model)
            error = TraceError(reason, module=module, location=location, source=source, remedy=remedy)
            error.details = err.getvalue() + out.getvalue()
            raise error from e
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    with torch_internals():
        gm = ep.module()
    gm.meta[SIGNATURE_KEY] = _signature(model)
    install_input_guard(gm)
    unpack_split_params(gm)   # packed Q/K/V weights (nn.MultiheadAttention): one parameter per projection
    stride_safe_views(gm)     # views of attention outputs must not depend on the kernel's strides
    _readable_names(gm)
    gm.graph.lint()
    gm.recompile()
    gm.meta["fxopt_example_inputs"] = (args, kwargs)
    gm.meta["fxopt_capture"] = {
        "front_end": "torch.export",
        "seconds": time.perf_counter() - start,
        "dynamic": mode,
        "dynamic_shapes": dyn,
        "range_constraints": {str(k): str(v) for k, v in ep.range_constraints.items()},
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
    }
    return gm

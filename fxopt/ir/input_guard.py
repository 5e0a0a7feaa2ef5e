"""Checks on the inputs of a captured module: a bad call names the input and says what to do.

A module from ``fxopt.trace``, ``fxopt.compile`` or ``fxopt.load`` is called like the
model it came from. Left to ``torch.export``'s own checks, a wrong call fails deep
inside the export guard (``IndexError`` for a missing dimension, ``AttributeError``
for ``None``, a pytree dump for a missing keyword, a kernel error for a wrong dtype).
:func:`install_input_guard` puts two checks on every captured module:

* a forward pre-hook compares the call with what was captured: positional and
  keyword inputs (a positional input is matched to its keyword name in the original
  ``forward`` and back, so ``fast(ids, mask)`` works for a model captured with
  ``kwargs={"input_ids": ..., "attention_mask": ...}``), missing and unexpected
  inputs, nested structure, and for every leaf its type, rank, dtype and static
  sizes, or a constant's value;
* :class:`InputGuard` wraps export's guard function, so a symbolic guard that fails
  (a size outside its compiled range, two sizes that must be equal) raises
  :class:`~fxopt.errors.InputError` as well.

Every failure is an :class:`~fxopt.errors.InputError`. ``GraphModule.__deepcopy__``
drops forward hooks, so the hook re-installs itself on deep copies. The checks are
skipped while ``torch.compile`` or ``torch.export`` traces the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.ir.dialect import GUARD_MODULE
from fxopt.errors import InputError

__all__ = ["InputGuard", "install_input_guard", "check_call", "LeafSpec"]

#: ``gm.meta`` key of the original ``forward``'s parameters, ``(name, default_is_none)``
SIGNATURE_KEY = "fxopt_signature"
_LEAVES_KEY = "fxopt_input_leaves"


@dataclass(frozen=True)
class LeafSpec:
    """One flat input of a captured module: a tensor (dtype, sizes; a symbolic size
    is its symbol's name) or a constant baked into the graph."""
    name: str
    is_tensor: bool
    dtype: Any = None
    shape: tuple = ()
    value: Any = None

    def describe(self) -> str:
        if not self.is_tensor:
            return f"the constant {self.value!r}"
        dims = ", ".join(str(s) for s in self.shape)
        return f"a {str(self.dtype).replace('torch.', '')} tensor of shape [{dims}]"


def _leaf_spec(name: str, node: fx.Node) -> LeafSpec | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape = tuple(int(s) if isinstance(s, int) else str(s.node.expr) if isinstance(s, torch.SymInt) else str(s)
                      for s in val.shape)
        return LeafSpec(name, True, val.dtype, shape)
    if val is None or isinstance(val, (bool, int, float, str)):
        return LeafSpec(name, False, value=val)
    return None   # a symbolic int or something else: not checked here


def _top_names(gm: fx.GraphModule, n_args: int) -> list[str]:
    sig = gm.meta.get(SIGNATURE_KEY)
    if sig:
        return [name for name, _ in sig][:n_args] + [f"args[{i}]" for i in range(len(sig), n_args)]
    orig = list(getattr(getattr(gm.graph._codegen, "pytree_info", None), "orig_args", None) or [])
    return [orig[i] if i < len(orig) else f"args[{i}]" for i in range(n_args)]


def _leaves(gm: fx.GraphModule) -> list[LeafSpec | None] | None:
    """The captured flat inputs in placeholder order, named as the user passes them."""
    cached = gm.meta.get(_LEAVES_KEY)
    if cached is not None:
        return cached
    spec = getattr(gm, "_in_spec", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if spec is None or spec.num_leaves != len(placeholders):
        return None
    args_spec, kwargs_spec = spec.children()
    tops = _top_names(gm, args_spec.num_children) + list(kwargs_spec.context)
    names = []
    for i, child in enumerate(args_spec.children() + kwargs_spec.children()):
        if child.is_leaf():
            names.append(tops[i])
            continue
        try:
            paths = [p for p, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * child.num_leaves,
                                                                                         child))[0]]
            names += [tops[i] + pytree.keystr(p) for p in paths]
        except Exception:  # noqa: BLE001 - a container that cannot be rebuilt from dummies: index names
            names += [f"{tops[i]}[leaf {j}]" for j in range(child.num_leaves)]
    leaves = [_leaf_spec(name, node) for name, node in zip(names, placeholders)]
    gm.meta[_LEAVES_KEY] = leaves
    return leaves


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    mod = type(value).__module__
    return f"a {type(value).__name__}" if mod == "builtins" else f"a {mod.split('.')[0]}.{type(value).__name__}"


def _check_leaf(want: LeafSpec, got: Any) -> None:
    if not want.is_tensor:
        if type(got) is not type(want.value) or got != want.value:
            raise InputError(f"input '{want.name}' is {got!r}, but the module was compiled with {want.value!r}, "
                             "a constant baked into the graph; pass that value, or compile again with "
                             f"'{want.name}'={got!r} in the example inputs")
        return
    if not isinstance(got, torch.Tensor):
        fix = " (torch.tensor(...))" if isinstance(got, (list, tuple, int, float)) else \
            " (torch.from_numpy(...))" if type(got).__module__ == "numpy" else ""
        raise InputError(f"input '{want.name}' is {_kind(got)}; the module was compiled for {want.describe()}: "
                         f"pass a torch.Tensor{fix}"
                         + (", or compile again with example inputs that leave it out" if got is None else ""))
    if got.dim() != len(want.shape):
        hint = " (add the batch dimension: x.unsqueeze(0))" if got.dim() == len(want.shape) - 1 else ""
        raise InputError(f"input '{want.name}' has {got.dim()} dimension(s) {list(got.shape)}; the module was "
                         f"compiled for {want.describe()}, {len(want.shape)} dimension(s){hint}")
    if got.dtype != want.dtype:
        raise InputError(f"input '{want.name}' is {str(got.dtype).replace('torch.', '')}; the module was compiled "
                         f"for {want.describe()}: convert it with .to({want.dtype})")
    for d, (n, w) in enumerate(zip(got.shape, want.shape)):
        if not isinstance(n, int):
            continue
        if isinstance(w, int) and n != w:
            raise InputError(f"input '{want.name}' has size {n} in dimension {d} {list(got.shape)}; the module "
                             f"was compiled for {want.describe()}, with dimension {d} fixed at {w}. Use inputs "
                             "of that size, or compile again with dynamic=True (every dimension symbolic) or a "
                             "torch.export dynamic_shapes spec that marks the dimension")


def _match_call(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """Map the call onto the captured (args, kwargs) structure, or raise InputError."""
    args_spec, kwargs_spec = gm._in_spec.children()
    n_pos, kw_names = args_spec.num_children, list(kwargs_spec.context)
    sig = gm.meta.get(SIGNATURE_KEY) or []
    names = [name for name, _ in sig]
    none_default = {name for name, is_none in sig if is_none}
    args, kwargs = list(args), dict(kwargs)
    captured = ", ".join(_top_names(gm, n_pos) + kw_names) or "no inputs"
    for i in range(n_pos, len(args)):       # extra positionals: keyword inputs given by position
        name = names[i] if i < len(names) else None
        if name in kw_names and name not in kwargs:
            kwargs[name] = args[i]
        elif name is not None and args[i] is None and name in none_default:
            continue                         # None for a parameter that defaults to None: the same call
        else:
            raise InputError(f"the module takes {n_pos} positional input(s) and got {len(args)}: positional input "
                             f"{i} ({name or 'unnamed'}) was not part of the call it was compiled for "
                             f"(inputs: {captured}); compile again with it in the example inputs")
    args = args[:n_pos]
    for i in range(len(args), n_pos):       # missing positionals: given by keyword
        name = names[i] if i < len(names) else None
        if name is not None and name in kwargs:
            args.append(kwargs.pop(name))
        else:
            raise InputError(f"missing input {name or f'args[{i}]'!r}: the module was compiled for the inputs "
                             f"{captured}; pass it")
    extra = [k for k in kwargs if k not in kw_names and not (kwargs[k] is None and k in none_default)]
    if extra:
        raise InputError(f"unexpected keyword input(s) {', '.join(map(repr, extra))}: the module was compiled "
                         f"for the inputs {captured}, and an input changes the graph; compile again with "
                         f"{extra[0]!r} in the example kwargs")
    missing = [k for k in kw_names if k not in kwargs]
    if missing:
        raise InputError(f"missing keyword input(s) {', '.join(map(repr, missing))}: the module was compiled for "
                         f"the inputs {captured}; pass {missing[0]!r} too (or compile again with example inputs "
                         "that leave it out)")
    return args, {k: kwargs[k] for k in kw_names}


def check_call(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Check ``gm(*args, **kwargs)`` against what was captured; return the call in captured form.

    Raises :class:`~fxopt.errors.InputError` naming the first input that does not fit
    (missing, unexpected, ``None``, not a tensor, wrong rank, dtype or static size, a
    different constant), with what was expected and what to do.
    """
    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return tuple(args), dict(kwargs)
    new_args, new_kwargs = _match_call(gm, args, kwargs)
    leaves = _leaves(gm)
    if leaves is None:
        return tuple(new_args), new_kwargs
    args_spec, kwargs_spec = spec.children()
    values = new_args + [new_kwargs[k] for k in kwargs_spec.context]
    tops = _top_names(gm, args_spec.num_children) + list(kwargs_spec.context)
    start = 0
    for name, value, child in zip(tops, values, args_spec.children() + kwargs_spec.children()):
        want = leaves[start:start + child.num_leaves]
        start += child.num_leaves
        if child.is_leaf():
            got = [value]
        else:
            got, got_spec = pytree.tree_flatten(value)
            if got_spec != child:
                was = "None" if child.type is type(None) else f"a {child.type.__name__} of {child.num_leaves} leaves"
                raise InputError(f"input '{name}' is {_kind(value)}, but the module was compiled with {was} "
                                 "there, and the structure of an input is part of the graph: pass the same "
                                 "structure, or compile again with this one")
        for w, g in zip(want, got):
            if w is not None:
                _check_leaf(w, g)
    return tuple(new_args), new_kwargs


def _empty_input(gm: fx.GraphModule, args: tuple, kwargs: dict) -> str | None:
    for i, leaf in enumerate(pytree.tree_leaves((args, kwargs))):
        if isinstance(leaf, torch.Tensor) and leaf.numel() == 0:
            leaves = _leaves(gm) or []
            spec = leaves[i] if i < len(leaves) else None
            if spec is None or spec.is_tensor and 0 not in spec.shape:
                return spec.name if spec is not None else f"leaf {i}"
    return None


def _pre_hook(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    args, kwargs = check_call(gm, args, kwargs)
    empty = _empty_input(gm, args, kwargs)
    if empty is not None:
        # an empty batch runs where the graph allows it (as the model does eagerly); where it does not,
        # say so instead of a reshape error from inside the graph. Empty inputs are cheap to run twice.
        try:
            gm.forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure on an empty input is reported as such
            cause = e.__cause__ if isinstance(e, InputError) and e.__cause__ is not None else e
            raise InputError(f"input '{empty}' is empty (a dimension of size 0) and the graph cannot run on "
                             f"it ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); most "
                             "attention models fail on empty batches eagerly too: skip empty batches before "
                             "calling the module") from e
    return args, kwargs


def _reinstall(copy: fx.GraphModule) -> None:
    install_input_guard(copy)


class InputGuard(torch.nn.Module):
    """Wraps export's guard function: a failing guard becomes an :class:`~fxopt.errors.InputError`."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        try:
            return self.inner(*args)
        except Exception as e:  # noqa: BLE001 - every guard failure is about the inputs
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            cond = text.split("Guard failed:", 1)[1].strip() if "Guard failed:" in text else None
            if cond is None:
                raise InputError(f"the inputs do not match the shapes this module was compiled for ({text}); "
                                 "compile again with dynamic=True (every dimension symbolic), a torch.export "
                                 "dynamic_shapes spec, or example inputs of this shape") from e
            raise InputError(f"the inputs break a condition the module was compiled under: {cond} (a size the "
                             "model fixed, or branches on). Call it with inputs that satisfy it, or compile "
                             "again with example inputs of this shape (dynamic=True makes every dimension "
                             "symbolic where the model allows)") from e


def install_input_guard(gm: fx.GraphModule) -> None:
    """Wrap ``gm``'s export guard in :class:`InputGuard` and check every call (idempotent)."""
    inner = getattr(gm, GUARD_MODULE, None)
    if isinstance(inner, torch.nn.Module) and not isinstance(inner, InputGuard):
        setattr(gm, GUARD_MODULE, InputGuard(inner))
    if getattr(gm, "_in_spec", None) is None:
        return
    gm.meta.pop(_LEAVES_KEY, None)
    if _pre_hook not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_pre_hook, prepend=True, with_kwargs=True)
    if _reinstall not in getattr(gm, "_deepcopy_hooks", [_reinstall]):
        gm._register_deepcopy_hook(_reinstall)

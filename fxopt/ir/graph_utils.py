"""Shared graph helpers: snapshots for rollback, output comparison, size statistics."""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.ir.torch_compat import torch_internals


__all__ = ["Snapshot", "take_snapshot", "restore_snapshot", "changed_tensors", "max_abs_error",
           "within_tolerance", "param_stats", "GraphSnapshot", "remove_unused_attributes", "state_tensors",
           "preserved_state", "fingerprint", "output_structure"]


def _tensor_attrs(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)}


@dataclass
class Snapshot:
    graph: fx.Graph
    modules: list  # (module, params, buffers, submodules, tensor attrs, non-persistent set)
    versions: list  # (name, tensor, version, fingerprint)
    clones: dict = field(default_factory=dict)  # id(tensor) -> (tensor, clone) for deep snapshots
    state: dict = field(default_factory=dict)  # name -> (tensor, clone): buffers the model itself writes


#: above this many bytes in all, fingerprints read every 61st word instead of all of them
FULL_FINGERPRINT_BYTES = 1 << 30


def fingerprint(t: torch.Tensor, sample: bool = False) -> int:
    """A cheap checksum of a tensor's bytes: the int64 sum of its raw 32-bit (or 8-bit) words.

    Catches writes that bypass version counters (``.data`` assignments and writes into
    ``.data``) in one pass over memory; a write that only permutes values is not seen.
    """
    if t.device.type == "meta" or t.numel() == 0:
        return 0
    with torch.no_grad():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
        if sample:
            words = words[::61]
        return int(words.sum(dtype=torch.int64))


def state_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers the graph itself writes when it runs (step counters, running statistics), by name."""
    from fxopt.ir.dialect import written_attrs
    if not isinstance(gm, fx.GraphModule):
        return {}
    out = {}
    for name in written_attrs(gm):
        obj: Any = gm
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor):
            out[name] = obj
    return out


class preserved_state:
    """Run ``gm`` inside this block without its state moving: buffers the model writes in ``forward``
    are put back afterwards. fxopt's own runs (verification, calibration, checks, timing) use it,
    so the module handed back holds the same state as the model it came from."""

    def __init__(self, gm: torch.nn.Module):
        self.gm = gm
        self.saved: dict = {}

    def __enter__(self) -> "preserved_state":
        self.saved = {k: (t, t.detach().clone()) for k, t in state_tensors(self.gm).items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for t, clone in self.saved.values():
                if t.shape == clone.shape:
                    t.copy_(clone)


def _all_tensors(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for d in (mod._parameters, mod._buffers, _tensor_attrs(mod)):
            for k, v in d.items():
                if v is not None:
                    out.append((f"{prefix}.{k}" if prefix else k, v))
    return out


def take_snapshot(gm: fx.GraphModule, deep: bool = False) -> Snapshot:
    """Everything needed to undo a pass: a copy of the graph, the module tree's
    attribute tables (tensors by reference) and the tensors' version counters.
    ``deep`` also clones tensor data, for passes that write into tensors in place."""
    modules = []
    for mod in gm.modules():
        modules.append((mod, dict(mod._parameters), dict(mod._buffers), dict(mod._modules),
                        _tensor_attrs(mod), set(mod._non_persistent_buffers_set)))
    state = {k: (t, t.detach().clone()) for k, t in state_tensors(gm).items()}
    tensors = [(n, t) for n, t in _all_tensors(gm) if not any(t is s for s, _ in state.values())]
    clones = {}
    if deep:
        for _, t in tensors:
            clones[id(t)] = (t, t.detach().clone())
    sample = sum(t.numel() * t.element_size() for _, t in tensors) > FULL_FINGERPRINT_BYTES
    versions = [(n, t, t._version, fingerprint(t, sample)) for n, t in tensors]
    with torch_internals():  # torch 2.13 warns about its own pytree specs being copied
        graph = copy.deepcopy(gm.graph)
    return Snapshot(graph, modules, versions, clones, state)


def restore_snapshot(gm: fx.GraphModule, snap: Snapshot) -> None:
    for mod, params, buffers, subs, tattrs, nonpersistent in snap.modules:
        mod._parameters = dict(params)
        mod._buffers = dict(buffers)
        mod._modules = dict(subs)
        mod._non_persistent_buffers_set = set(nonpersistent)
        for k in [k for k, v in mod.__dict__.items() if isinstance(v, torch.Tensor) and k not in tattrs]:
            delattr(mod, k)
        for k, v in tattrs.items():
            mod.__dict__[k] = v
    with torch.no_grad():
        for t, clone in snap.clones.values():
            t.data = clone
        for t, clone in snap.state.values():
            t.data = clone.clone()
    with torch_internals():
        gm.graph = copy.deepcopy(snap.graph)
    gm.recompile()


def changed_tensors(snap: Snapshot) -> list[str]:
    """Names of tensors that were written in place since the snapshot.

    Version counters catch ordinary in-place writes; fingerprints catch writes through
    ``.data``; the model's own state (buffers it writes in ``forward``) must hold the values
    it had, since fxopt's runs put them back.
    """
    sample = sum(t.numel() * t.element_size() for _, t, _, _ in snap.versions) > FULL_FINGERPRINT_BYTES
    out = [name for name, t, v, fp in snap.versions if t._version != v or fingerprint(t, sample) != fp]
    out += [name for name, (t, clone) in snap.state.items()
            if t.shape != clone.shape or not torch.equal(t.detach(), clone)]
    return out


def hf_cache_bases() -> tuple[type, ...]:
    """transformers' ``Cache`` and ``CacheLayerMixin`` (empty when transformers is not loaded)."""
    if "transformers" not in sys.modules:
        return ()
    try:
        from transformers import cache_utils
    except ImportError:
        return ()
    return tuple(b for b in (getattr(cache_utils, "Cache", None), getattr(cache_utils, "CacheLayerMixin", None))
                 if isinstance(b, type))


def _is_cache_type(t: Any) -> bool:
    """A Hugging Face key/value cache class (``DynamicCache``, its layers, ...)."""
    bases = hf_cache_bases() if isinstance(t, type) else ()
    return bool(bases) and issubclass(t, bases)


def cache_leaves(spec: Any) -> set[int]:
    """Indices of the flat leaves of pytree ``spec`` that lie inside a key/value cache."""
    found: set[int] = set()

    def walk(sp: Any, start: int, inside: bool) -> int:
        inside = inside or _is_cache_type(getattr(sp, "type", None))
        if sp.is_leaf():
            if inside:
                found.add(start)
            return start + 1
        for child in (sp.children() if callable(getattr(sp, "children", None)) else sp.children_specs):
            start = walk(child, start, inside)
        return start
    try:
        walk(spec, 0, False)
    except (AttributeError, TypeError):
        return set()
    return found


def graph_cache_outputs(gm: fx.GraphModule) -> set[int]:
    """Indices of the output node's leaves that a captured decoder returns inside its key/value cache."""
    info = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    return cache_leaves(spec) if spec is not None else set()


def output_structure(out: Any) -> tuple:
    """What a caller relies on in a model's outputs: the tree, and each tensor leaf's shape and dtype.

    The head count (dim 1) of a key/value cache's tensors is left out: pruning attention heads
    shrinks the cache, which only the same pruned model reads back."""
    leaves, spec = pytree.tree_flatten(out)
    cache = cache_leaves(spec)

    def shape(i: int, x: torch.Tensor) -> tuple:
        s = tuple(x.shape)
        return s[:1] + (None,) + s[2:] if i in cache and x.dim() == 4 else s
    return (str(spec), tuple((shape(i, x), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                             for i, x in enumerate(leaves)))


def _leaves(out: Any) -> tuple[list, Any]:
    return pytree.tree_flatten(out)


def max_abs_error(a: Any, b: Any) -> float:
    """Largest absolute difference between two output structures (inf on any mismatch)."""
    la, sa = _leaves(a)
    lb, sb = _leaves(b)
    if sa != sb or len(la) != len(lb):
        return math.inf
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return math.inf
            if x.numel() == 0:
                continue
            xd, yd = x.detach().double(), y.detach().double()
            nan = torch.isnan(xd) != torch.isnan(yd)
            if bool(nan.any()):
                return math.inf
            both = ~torch.isnan(xd)
            if bool(both.any()):
                worst = max(worst, float((xd[both] - yd[both]).abs().max()))
        elif isinstance(x, (int, float, bool)) and isinstance(y, (int, float, bool)):
            worst = max(worst, abs(float(x) - float(y)))
        elif type(x) is not type(y) or (not isinstance(x, torch.Tensor) and x != y):
            return math.inf
    return worst


def within_tolerance(new: Any, ref: Any, atol: float, rtol: float) -> tuple[bool, float]:
    """(all leaves satisfy |new-ref| <= atol + rtol*|ref|, max abs error)."""
    err = max_abs_error(new, ref)
    if math.isinf(err):
        return False, err
    for x, y in zip(_leaves(new)[0], _leaves(ref)[0]):
        if isinstance(x, torch.Tensor) and x.numel():
            xd, yd = x.detach().double(), y.detach().double()
            ok = (xd - yd).abs() <= atol + rtol * yd.abs()
            ok |= torch.isnan(xd) & torch.isnan(yd)
            if not bool(ok.all()):
                return False, err
    return True, err


def param_stats(gm: torch.nn.Module) -> tuple[int, int]:
    """(number of parameter/buffer elements, their bytes), counting shared tensors once."""
    seen: set[int] = set()
    numel = nbytes = 0
    for _, t in _all_tensors(gm):
        if id(t) in seen:
            continue
        seen.add(id(t))
        numel += t.numel()
        nbytes += t.numel() * t.element_size()
    return numel, nbytes


def remove_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters, buffers and tensor attributes no ``get_attr`` reads. Returns how many."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    # attributes passes asked to keep although no node reads them (sparsity masks), as long as
    # the tensor they belong to is still read
    for name, owner in dict(gm.meta.get("fxopt_keep_attrs", {})).items():
        if owner in used:
            used.add(name)
        else:
            del gm.meta["fxopt_keep_attrs"][name]
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for prefix, mod in list(gm.named_modules()):
        if any(u == prefix or u.startswith(prefix + ".") for u in used_modules) and prefix:
            continue
        for d in (mod._parameters, mod._buffers):
            for k in list(d):
                full = f"{prefix}.{k}" if prefix else k
                if full not in used:
                    del d[k]
                    mod._non_persistent_buffers_set.discard(k)
                    removed += 1
        for k in list(_tensor_attrs(mod)):
            full = f"{prefix}.{k}" if prefix else k
            if full not in used:
                delattr(mod, k)
                removed += 1
    gm.delete_all_unused_submodules()
    return removed


from fxopt.ir.snapshot import GraphSnapshot, NodeInfo  # noqa: E402,F401  (re-exported)

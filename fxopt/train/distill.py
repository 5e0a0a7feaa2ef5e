"""Knowledge distillation for :func:`fxopt.finetune`: a teacher's outputs and hidden features as targets.

``fxopt.finetune(student, data, teacher=model, distill="logits"|"hidden"|"both")``:

* ``"logits"``: KL divergence between the softened class distributions,
  ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al.), for classifiers;
* ``"hidden"``: a feature loss on pairs of hidden states (``features={student_path: teacher_path}``,
  module paths such as ``"encoder.layer.3"``; default: the model's output itself, which for an
  encoder is its last hidden state). ``hidden_loss="mse"`` (mean squared error divided by the
  teacher feature's mean square, so that it is scale-free), ``"cosine"`` (1 - cosine along the
  feature dimension) or ``"mse+cosine"``;
  in a Hugging Face style batch (a dict with a ``[batch, seq]`` integer ``attention_mask``) the
  ``[batch, seq, width]`` features are compared at real tokens only: nothing reads the padding
  positions, and on short sentences padded to the longest of their batch they can be half of all
  positions;
* ``"both"``: the two together.

Where a pair's widths differ (the student is pruned), a learned projection (a linear layer over
the feature dimension, initialized to copy the kept channels where it can) maps the student's
feature to the teacher's; it trains with the student and is dropped afterwards.

Features are read without rewriting the user's model: forward hooks on a plain module, and on a
compiled graph (its nodes remember the module they came from) a recording node after the last node
of that module, inserted into the training copy only and removed before it is returned.

With labels (``(inputs, targets)`` batches), the loss is ``(1 - alpha) * task + alpha * distill``;
without (``inputs`` alone: a tensor or a dict of keyword inputs), it is the distillation loss alone.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import os
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.ir.torch_compat import torch_internals

__all__ = ["Distiller", "cache_budget", "resolve_teacher", "DISTILL_MODES", "HIDDEN_LOSSES"]

DISTILL_MODES = ("logits", "hidden", "both")
HIDDEN_LOSSES = ("mse", "cosine", "mse+cosine")
OUTPUT = "<output>"  # the model's output as a feature


def resolve_teacher(student: torch.nn.Module, teacher: torch.nn.Module | None) -> torch.nn.Module:
    """The teacher given, or the uncompressed model ``student`` was compiled from."""
    if teacher is not None:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        return teacher
    source = source_of(student)
    if source is None:
        raise InputError("distillation needs a teacher: pass teacher=model (the default, the model the student was "
                         "compiled from, is only known for a module returned by fxopt.compile while that model "
                         "is still alive)")
    return source


def source_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model ``model`` was compiled from, while it is alive (``fxopt.compile`` keeps a weak reference)."""
    meta = getattr(model, "meta", None)
    ref = meta.get("fxopt_source") if isinstance(meta, dict) else None
    return ref() if callable(ref) else None


def _module_paths(model: torch.nn.Module) -> set[str]:
    if isinstance(model, fx.GraphModule):
        out = set()
        for n in model.graph.nodes:
            for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                if path and not path.startswith("_"):
                    out.add(path)
        return out
    return {name for name, _ in model.named_modules() if name}


def _block_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the repeated blocks of a model: the children of its ``nn.ModuleList``s."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList):
            out += [f"{name}.{k}" if name else k for k, _ in m.named_children()]
    return out


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "values") and callable(value.values):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class _Taps:
    """Records named hidden features of one model during a forward pass."""

    def __init__(self, model: torch.nn.Module, paths: list[str], role: str):
        self.model, self.values, self._undo = model, {}, []
        if not paths:
            return
        if isinstance(model, fx.GraphModule):
            self._tap_graph(model, paths, role)
        else:
            modules = dict(model.named_modules())
            for p in paths:
                if p not in modules:
                    raise InputError(f"the {role} has no module '{p}' to distill from; its modules include "
                                     f"{', '.join(sorted(modules)[:12])}...")
                handle = modules[p].register_forward_hook(self._hook(p))
                self._undo.append(handle.remove)

    def _hook(self, path: str) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.values[path] = _first_tensor(output)
        return hook

    def _record(self, x: torch.Tensor, path: str) -> torch.Tensor:
        self.values[path] = x
        return x

    def _tap_graph(self, gm: fx.GraphModule, paths: list[str], role: str) -> None:
        inserted = []
        for p in paths:
            nodes = list(gm.graph.nodes)   # with the taps inserted so far (a block and its sublayer both tapped)
            inside = [n for n in nodes if n.op == "call_function" and _in_module(n, p)]
            # the module's output: the last of its nodes read outside it, a floating-point tensor
            outs = [n for n in inside if any(not _in_module(u, p) for u in n.users)
                    and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
            if not outs:
                raise InputError(f"the {role} graph has no node from module '{p}' (pruned or fused away?); "
                                 f"pass features= with paths it has, e.g. {', '.join(sorted(_module_paths(gm))[:8])}")
            last = outs[-1]
            with gm.graph.inserting_after(last):
                tap = gm.graph.call_function(self._record, (last, p))
            for u in list(last.users):
                if u is not tap:
                    u.replace_input_with(last, tap)
            tap.meta = dict(last.meta)
            inserted.append(tap)
        gm.recompile()

        def undo() -> None:
            for tap in inserted:
                tap.replace_all_uses_with(tap.args[0])
                gm.graph.erase_node(tap)
            gm.recompile()
        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def _in_module(node: fx.Node, path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p, _ in (node.meta.get("nn_module_stack") or {}).values())


def _width_dim(s: torch.Size, t: torch.Size) -> int | None:
    """The one dimension where a student and a teacher feature differ (None: same shape)."""
    if s == t:
        return None
    if len(s) != len(t):
        raise InputError(f"student feature of shape {tuple(s)} cannot be matched to the teacher's {tuple(t)}")
    diff = [d for d in range(len(s)) if s[d] != t[d]]
    if len(diff) != 1 or diff[0] == 0:
        raise InputError(f"student feature of shape {tuple(s)} differs from the teacher's {tuple(t)} in "
                         f"{'the batch' if diff == [0] else 'more than one'} dimension; distill features of one width")
    return diff[0]


class _Projection(torch.nn.Module):
    """A learned linear map of the student's feature dimension onto the teacher's."""

    def __init__(self, dim: int, s_width: int, t_width: int):
        super().__init__()
        self.dim = dim
        self.linear = torch.nn.Linear(s_width, t_width, bias=False)
        with torch.no_grad():  # start as a copy of the kept channels into the first ones
            self.linear.weight.zero_()
            k = min(s_width, t_width)
            self.linear.weight[:k, :k] = torch.eye(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)


def _feature_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() == 4 else -1  # channels of an image feature, else the last (hidden) dimension


def _snapshot(inputs: Any) -> tuple | None:
    """A batch's structure and copies of its leaves (tensors cloned), to recognise it again; None when a
    leaf is neither a tensor nor a plain value (it cannot be compared)."""
    from torch.utils._pytree import tree_flatten
    leaves, spec = tree_flatten(inputs)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf.detach().clone())
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            out.append(leaf)
        else:
            return None
    return spec, out


def _same_inputs(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1]):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _rng_states() -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += list(torch.cuda.get_rng_state_all())
    return states


def _same_rng(a: list[torch.Tensor] | None, b: list[torch.Tensor]) -> bool:
    return a is not None and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


TEACHER_CACHE_BYTES = 2 << 30


def cache_budget(teacher_cache: Any, data: Any, teacher: torch.nn.Module | None = None) -> int:
    """Bytes the teacher's targets may take (see ``finetune``'s ``teacher_cache``); 0 unless ``data`` is a
    list. ``"auto"`` counts the free memory of the device the teacher's targets live on."""
    if teacher_cache is False or teacher_cache is None:
        return 0
    if isinstance(teacher_cache, str) and teacher_cache != "auto":
        raise InputError(f"teacher_cache must be 'auto', True, False or a number of bytes, got {teacher_cache!r}")
    if teacher_cache == "auto" or teacher_cache is True:
        budget = None
    elif isinstance(teacher_cache, (int, float)) and math.isfinite(teacher_cache) and teacher_cache >= 0:
        budget = int(teacher_cache)
    else:
        raise InputError(f"teacher_cache must be 'auto', True, False or a number of bytes, got {teacher_cache!r}")
    if not isinstance(data, (list, tuple)):
        return 0
    if budget is not None:
        return budget
    param = next(iter(teacher.parameters()), None) if teacher is not None else None
    free = TEACHER_CACHE_BYTES * 4
    try:
        if param is not None and param.device.type == "cuda":
            free = torch.cuda.mem_get_info(param.device)[0]
        elif param is None or param.device.type == "cpu":
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        else:
            return 0   # a device whose free memory is not known here: no cache
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return min(TEACHER_CACHE_BYTES, free // 4)


class Distiller:
    """The distillation objective of one fine-tuning run (see the module docstring)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, mode: str, *, temperature: float = 2.0,
                 alpha: float = 0.5, features: Any = None, hidden_loss: str = "mse",
                 cache_bytes: int = 0):
        if mode not in DISTILL_MODES:
            raise InputError(f"distill must be one of {', '.join(DISTILL_MODES)}, got {mode!r}")
        if hidden_loss not in HIDDEN_LOSSES:
            raise InputError(f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, got {hidden_loss!r}")
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise InputError(f"alpha must be in [0, 1], got {alpha}")
        self.mode, self.temperature, self.alpha, self.hidden_loss = mode, float(temperature), float(alpha), hidden_loss
        with torch_internals():
            self.teacher = copy.deepcopy(teacher)  # never put the user's model in eval mode or hook it
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.pairs = self._pairs(student, features) if mode != "logits" else []
        self.s_taps = _Taps(student, [s for s, _ in self.pairs if s != OUTPUT], "student")
        try:
            self.t_taps = _Taps(self.teacher, [t for _, t in self.pairs if t != OUTPUT], "teacher")
        except Exception:
            self.s_taps.remove()  # nothing stays hooked into the student
            raise
        self.projections = torch.nn.ModuleDict()
        self._checked = False
        # the teacher's targets of each batch of a list, kept after the first epoch (bounded)
        self._cache: dict[int, tuple] = {}
        self._cache_room = int(cache_bytes)
        self.cache_hits = 0

    def _pairs(self, student: torch.nn.Module, features: Any) -> list[tuple[str, str]]:
        if features is None:
            blocks = _block_paths(self.teacher)
            have = _module_paths(student)
            common = [b for b in blocks if b in have]
            return [(b, b) for b in common] + [(OUTPUT, OUTPUT)] if common else [(OUTPUT, OUTPUT)]
        if isinstance(features, str):
            features = [features]
        if isinstance(features, (list, tuple)):
            pairs: list[tuple[str, str]] = []
            names = _module_paths(self.teacher)
            for f in features:
                matched = sorted(n for n in names if fnmatch.fnmatchcase(n, f)) if any(c in f for c in "*?[") else [f]
                if not matched:
                    raise InputError(f"features pattern '{f}' matches no module of the teacher")
                pairs += [(m, m) for m in matched]
            return pairs
        if isinstance(features, dict):
            return [(str(s), str(t)) for s, t in features.items()]
        raise InputError(f"features must be a dict {{student_path: teacher_path}}, a list of paths or None, got "
                         f"{type(features).__name__}")

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.projections.parameters()

    def teacher_outputs(self, call: Callable[[torch.nn.Module], Any], key: tuple | None = None) -> tuple[Any, dict]:
        """The teacher's output and features on one batch. ``key`` ``(index, inputs)``: the batch's place in
        a list that every epoch reads again; its targets are kept (copies of the tensors the loss reads,
        and of the inputs they came from, while the cache has room) and returned again when inputs equal
        to those come back there: the teacher runs once per batch, not once per epoch. A batch whose
        tensors were replaced or edited in place since misses and runs the teacher again; a teacher that
        draws random numbers in eval mode (sampling, injected noise) turns the cache off."""
        seen = None
        if key is not None and (self._cache_room > 0 or key[0] in self._cache):
            seen = _snapshot(key[1])
            hit = self._cache.get(key[0])
            if hit is not None and seen is not None and _same_inputs(hit[0], seen):
                self.cache_hits += 1
                return hit[1], dict(hit[2])
        self.t_taps.values = {}
        caching = key is not None and seen is not None and self._cache_room > 0
        rng = _rng_states() if caching else None
        with torch.no_grad():
            out = call(self.teacher)
        feats = dict(self.t_taps.values)
        if caching:
            old = self._cache.pop(key[0], None)
            if old is not None:
                self._cache_room += old[3]
            main = _first_tensor(out)
            kept = {k: v.clone() for k, v in feats.items() if isinstance(v, torch.Tensor)}
            tensors = [*kept.values(), *([main] if main is not None else []), *seen[1]]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            if not _same_rng(rng, _rng_states()):
                self._cache_room = 0   # the teacher is random: the same inputs need not give the same targets
                self._cache.clear()
            elif main is not None and len(kept) == len(feats) and size <= self._cache_room:
                # clones: a runtime may reuse its buffers
                self._cache[key[0]] = (seen, main.clone(), kept, size)
                self._cache_room -= size
            else:
                self._cache_room = 0   # full (or not cacheable): later batches run the teacher every epoch
        return out, feats

    def reset(self) -> None:
        self.s_taps.values = {}

    def _check(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> None:
        if s_logits.shape != t_logits.shape:
            raise InputError(f"the teacher's output has shape {tuple(t_logits.shape)}, the student's "
                             f"{tuple(s_logits.shape)}: distill='logits' needs the same outputs (the same task); "
                             "use distill='hidden' with features= for a different head")

    def loss(self, s_out: Any, t_out: Any, t_feats: dict, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The distillation loss of one batch and its parts (floats, for the history). ``mask``: the batch's
        ``[batch, seq]`` real-token mask (:func:`~fxopt.quant.calibrate.token_mask`); hidden features of
        that shape compare real tokens only."""
        parts: dict[str, torch.Tensor] = {}
        s_main, t_main = _first_tensor(s_out), _first_tensor(t_out)
        if s_main is None or t_main is None:
            raise InputError("the student or the teacher returned no tensor to distill")
        if self.mode in ("logits", "both"):
            self._check(s_main, t_main)
            T = self.temperature
            s_log = torch.log_softmax(s_main.float() / T, -1)
            t_log = torch.log_softmax(t_main.float() / T, -1)
            parts["kd"] = torch.nn.functional.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * T * T \
                / max(1, s_main[..., 0].numel() // max(1, s_main.shape[0]))
        if self.mode in ("hidden", "both"):
            total = 0.0
            for s_path, t_path in self.pairs:
                if self.mode == "both" and s_path == OUTPUT:
                    continue  # the output is distilled as logits
                s = s_main if s_path == OUTPUT else self.s_taps.values.get(s_path)
                t = t_main if t_path == OUTPUT else t_feats.get(t_path)
                if s is None or t is None:
                    raise InputError(f"the {'student' if s is None else 'teacher'} never computed feature "
                                     f"'{s_path if s is None else t_path}' in this batch")
                total = total + self._feature_loss(s_path, s, t.detach(), mask)
            if self.pairs and not (self.mode == "both" and all(s == OUTPUT for s, _ in self.pairs)):
                parts["hidden"] = total / max(1, sum(1 for s, _ in self.pairs if not (self.mode == "both" and s == OUTPUT)))
        value = sum(parts.values())
        return value, {k: float(v.detach()) for k, v in parts.items()}

    def _feature_loss(self, key: str, s: torch.Tensor, t: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        s, t = s.float(), t.float()
        if mask is not None and s.dim() == 3 and t.dim() == 3 and s.shape[:2] == mask.shape == t.shape[:2] \
                and bool(mask.any()):
            # padding positions: nothing reads them (attention masks them out, pooling skips them), and
            # matching the teacher's arbitrary values there costs the student capacity it needs elsewhere
            s, t = s[mask], t[mask]
        dim = _width_dim(s.shape, t.shape)
        if dim is not None:
            name = key.replace(".", "__") or "out"
            if name not in self.projections:
                if dim != (s.dim() - 1 if _feature_dim(s) == -1 else 1):
                    raise InputError(f"feature '{key}' differs from the teacher's in dimension {dim}, not its "
                                     f"feature dimension: shapes {tuple(s.shape)} and {tuple(t.shape)}")
                self.projections[name] = _Projection(dim, s.shape[dim], t.shape[dim]).to(s.device)
                self.new_parameters = True
            s = self.projections[name](s)
        fd = _feature_dim(t)
        out = 0.0
        if "mse" in self.hidden_loss:
            out = out + torch.nn.functional.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
        if "cosine" in self.hidden_loss:
            out = out + (1 - torch.nn.functional.cosine_similarity(s, t, dim=fd, eps=1e-8)).mean()
        return out

    def remove(self) -> None:
        self.s_taps.remove()
        self.t_taps.remove()

"""``fxopt.finetune``: recover accuracy after compression with mini-batch training.

Works on plain modules and on modules returned by ``fxopt.compile`` (their graphs
keep inference semantics: batch norm uses its running statistics, dropout is gone;
fine-tuning updates the weights). The model you pass is copied unless
``inplace=True``.

    >>> import torch, fxopt
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> model, hist = fxopt.finetune(torch.nn.Linear(4, 2), data, epochs=3, lr=0.1, progress=False)
    >>> len(hist.epochs), hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    (3, True)

Optimizers: ``"sgd"`` (mini-batch SGD with momentum, Nesterov and weight decay
options; the core), ``"adam"``, ``"adamw"``. Schedules (per step, with optional
linear warm-up): ``"constant"``, ``"cosine"``, ``"step"`` (``step_size`` epochs,
``gamma``), ``"linear"`` (to zero), ``"onecycle"``. ``amp``: ``"bf16"`` autocast
(CPU or GPU) or ``"fp16"`` with a gradient scaler (GPU). ``loss``:
``"cross_entropy"``, ``"mse"``, ``"l1"``, or a callable ``loss(outputs, targets)``.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from fxopt.errors import InputError
from fxopt.ir.torch_compat import torch_internals
from fxopt.quant.calibrate import token_mask


def _train_bn(x, weight, bias, running_mean, running_var, momentum, eps):  # noqa: ANN001
    """Training-mode batch norm with the inference op's signature (updates the running stats)."""
    out = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return out, None, None


def _swap_bn(model: torch.nn.Module, train: bool) -> int:
    """Switch a compiled graph's inference batch norms to training mode (and back)."""
    if not isinstance(model, torch.fx.GraphModule):
        return 0
    frozen = torch.ops.aten._native_batch_norm_legit_no_training.default
    n = 0
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is (frozen if train else _train_bn):
            node.target = _train_bn if train else frozen
            n += 1
    if n:
        model.recompile()
    return n


def reapply_masks(model: torch.nn.Module) -> int:
    from fxopt.ir.masks import reapply_masks as _reapply
    return _reapply(model)

__all__ = ["finetune", "gradual_prune", "FinetuneHistory", "cubic_sparsity", "make_optimizer", "make_schedule"]


@dataclass
class FinetuneHistory:
    """Per-epoch records: ``{"epoch", "loss", "accuracy", "lr", "seconds", "eval_loss", "eval_accuracy"}``."""

    epochs: list = field(default_factory=list)
    steps: int = 0
    teacher_cache_hits: int = 0   # distillation batches whose teacher targets came from the first epoch's run

    def table(self) -> str:
        keys = [k for k in ("epoch", "loss", "kd", "hidden", "accuracy", "eval_loss", "eval_accuracy", "lr", "seconds")
                if any(k in e for e in self.epochs)]
        rows = [[_fmt(e.get(k)) for k in keys] for e in self.epochs]
        widths = [max(len(x) for x in col) for col in zip(keys, *rows)]
        return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [keys, *rows])

    def __str__(self) -> str:
        return self.table()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_LOSSES: dict[str, Callable] = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": torch.nn.functional.mse_loss,
    "l1": torch.nn.functional.l1_loss,
}


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual pruning schedule: sparsity at ``step`` rising from ``initial`` at
    ``begin`` to ``final`` at ``end`` as ``final + (initial - final) * (1 - t)^3``."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    t = (step - begin) / max(1, end - begin)
    return final + (initial - final) * (1 - t) ** 3


def make_optimizer(params: Iterable, name: str, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool) -> torch.optim.Optimizer:
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups (discriminative learning rates)
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters (requires_grad=True)")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer '{name}'; use sgd, adam or adamw")


def make_schedule(name: str, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0,
                  step_size: int = 1, gamma: float = 0.1) -> Callable[[int], float]:
    """A multiplier of the base learning rate for each optimizer step."""
    if name not in ("constant", "cosine", "step", "linear", "onecycle"):
        raise InputError(f"unknown schedule '{name}'; use constant, cosine, step, linear or onecycle")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        s = step - warmup_steps
        n = max(1, total_steps - warmup_steps)
        if name == "constant":
            return 1.0
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, n) / n))
        if name == "linear":
            return max(0.0, 1 - s / n)
        if name == "step":
            return gamma ** ((step // max(1, steps_per_epoch)) // max(1, step_size))
        # onecycle: up for 30% of the steps, then cosine down
        up = max(1, int(0.3 * n))
        if s < up:
            return 0.1 + 0.9 * s / up
        return 0.5 * (1 + math.cos(math.pi * (s - up) / max(1, n - up)))
    return factor


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    raise InputError(f"cannot find the prediction in a model output of type {type(out).__name__}")


def _batches(data: Iterable, epoch: int, unlabeled: bool = False) -> Iterable:
    """``(inputs, targets)`` pairs; with ``unlabeled`` (distillation) a batch may be the inputs alone
    (a tensor, a dict of keyword inputs, or a tuple of other than two positional inputs): targets None."""
    for i, item in enumerate(data):
        if isinstance(item, (tuple, list)) and len(item) == 2:
            yield item
        elif unlabeled and (isinstance(item, (torch.Tensor, dict)) or isinstance(item, (tuple, list)) and item):
            yield item, None
        else:
            raise InputError(f"batch {i} of epoch {epoch} is a {type(item).__name__}; fine-tuning data must "
                             "yield (inputs, targets) pairs (a DataLoader over a TensorDataset does)"
                             + ("" if unlabeled else "; with a teacher (distill=) the inputs alone will do"))


def _has_pairs(data: Any) -> bool:
    """Are the batches ``(inputs, targets)`` pairs (rather than the inputs alone)?"""
    first = next(iter(data), None)
    return isinstance(first, (tuple, list)) and len(first) == 2


def _has_labels(data: Any) -> bool:
    """Do the batches carry integer class labels (``(inputs, targets)`` with integer targets)?"""
    first = next(iter(data), None)
    return isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[1], torch.Tensor) \
        and not first[1].is_floating_point()


def _evaluate(model: torch.nn.Module, data: Iterable, loss_fn: Callable) -> tuple[float, float | None]:
    total, n, correct, counted = 0.0, 0, 0, 0
    with torch.no_grad():
        for inputs, target in _batches(data, -1):
            out = _logits(_forward(model, inputs, "model (on eval_data)"))
            total += float(_loss(loss_fn, out, target)) * len(target)
            n += len(target)
            if out.dim() == target.dim() + 1 and not target.is_floating_point():
                correct += int((out.argmax(-1) == target).sum())
                counted += target.numel()
    if n == 0:
        raise InputError("eval_data is empty (or an exhausted iterator): nothing was evaluated")
    if not math.isfinite(total):
        raise InputError(f"the loss on eval_data is {total}: check eval_data for NaN/Inf")
    return total / n, (100.0 * correct / counted if counted else None)


def finetune(model: torch.nn.Module, data: Iterable, *, epochs: int = 1, optimizer: str = "sgd",
             lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
             schedule: str = "cosine", warmup_steps: int = 0, step_size: int = 1, gamma: float = 0.1,
             amp: str | None = None, loss: str | Callable = "cross_entropy", eval_data: Iterable | None = None,
             clip_grad_norm: float | None = None, seed: int | None = 0, inplace: bool = False,
             progress: bool | None = None, on_step: Callable[[int, torch.nn.Module], None] | None = None,
             keep_sparsity: bool = True, train_bn: bool = True, teacher: torch.nn.Module | None = None,
             distill: str | None = None, temperature: float = 2.0, alpha: float = 0.5, features: Any = None,
             hidden_loss: str = "mse", lr_multipliers: dict | None = None,
             teacher_cache: Any = "auto") -> tuple[torch.nn.Module, FinetuneHistory]:
    """Train ``model`` on ``data`` (an iterable of ``(inputs, targets)`` batches, re-iterable when
    ``epochs > 1``); return ``(trained_model, history)``. See the module docstring.

    ``on_step(step, model)`` runs after every optimizer step (gradual pruning hooks in here).
    ``keep_sparsity``: weights pruned by fxopt's sparsity passes stay zero (their masks are
    re-applied after every step). ``train_bn``: a compiled graph's batch norms train like
    ``nn.BatchNorm`` in train mode (batch statistics, running statistics updated), which
    is what lets a pruned network recover; they are inference batch norms again afterwards.
    ``seed`` makes the run deterministic (torch, Python ``random``); ``None`` leaves RNGs alone.

    Distillation (:mod:`fxopt.train.distill`): ``distill="logits"|"hidden"|"both"`` (``True``: logits
    when the batches carry integer labels, else hidden states) trains the
    student against ``teacher`` (default: the uncompressed model a compiled student came from;
    a ``teacher`` given alone means ``"logits"``): ``temperature`` softens the logits, ``alpha``
    weighs the distillation loss against the task loss (``(1 - alpha) * task + alpha * distill``;
    unlabeled batches, the inputs alone, train on the distillation loss only), ``features``
    pairs hidden states by module path (``{student_path: teacher_path}``, a list of paths the two
    share, or glob patterns; default: the blocks of the teacher's ``ModuleList``s the student
    still has, and the output), ``hidden_loss`` is ``"mse"`` (relative), ``"cosine"`` or
    ``"mse+cosine"``. Widths that differ (pruned layers) are matched by a learned projection.
    The teacher is copied: it is never changed or put in eval mode.

    ``lr_multipliers``: ``{parameter name or glob: factor}``, discriminative learning rates (a
    backbone at 0.1x its head, say; :func:`fxopt.transfer` uses it).

    ``teacher_cache``: when ``data`` is a list (or tuple) read again every epoch, the teacher's targets
    of each batch are kept after the first epoch and the teacher is not run again on it. ``"auto"``
    (default): up to 2 GiB or a quarter of the free memory of the teacher's device, whichever is less
    (batches beyond that run the teacher every epoch); a number: that many bytes; ``False``: off. A
    batch is reused only when its inputs equal the ones its targets came from (a batch edited or
    re-masked between epochs runs the teacher again), and a teacher that draws random numbers turns
    the cache off. A DataLoader (new tensors every epoch, perhaps shuffled) never uses it.
    ``history.teacher_cache_hits`` counts the reuses.

    A model returned by :func:`fxopt.compile` distills by default from the model it was compiled
    from; after training without that teacher, the returned model no longer does (it is its own
    reference now: pass ``teacher=`` to choose).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"finetune expects a torch.nn.Module, got {type(model).__name__}")
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    # lr=0 is allowed: it re-estimates batch-norm statistics alone (train_bn) without moving a weight
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise InputError(f"lr must be a finite number >= 0, got {lr!r}")
    if eval_data is not None and iter(eval_data) is eval_data and epochs > 1:  # type: ignore[call-overload]
        raise InputError("eval_data is a one-shot iterator but epochs > 1; pass a list or a DataLoader")
    if iter(data) is data and epochs > 1:  # type: ignore[call-overload]
        raise InputError("data is a one-shot iterator but epochs > 1; pass a list or a DataLoader")
    loss_fn = _LOSSES.get(loss) if isinstance(loss, str) else loss
    if loss_fn is None:
        raise InputError(f"unknown loss '{loss}'; use {', '.join(_LOSSES)} or a callable")
    if amp not in (None, "bf16", "fp16"):
        raise InputError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if seed is not None:
        torch.manual_seed(seed)
        random.seed(seed)
    if not inplace:
        history_of = getattr(model, "fxopt_history", None)
        with torch_internals():
            model = copy.deepcopy(model)
        if history_of is not None and getattr(model, "fxopt_history", None) is None:
            model.fxopt_history = copy.copy(history_of)   # a graph's deepcopy drops it: what compile did stays shown
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 0
    if steps_per_epoch == 0 and hasattr(data, "__len__"):
        raise InputError("the fine-tuning data is empty")
    if teacher is not None and distill is None:
        distill = "logits"
    if distill is True:  # logits for a classifier (integer labels), hidden states otherwise
        distill = "logits" if _has_labels(data) else "hidden"
    elif distill is False:
        distill = None
    distiller = None
    from fxopt.train.distill import Distiller, cache_budget, resolve_teacher, source_of
    source = source_of(model)
    cache_budget(teacher_cache, None)   # the option is checked whatever the data
    if distill is not None:
        teacher = resolve_teacher(model, teacher)
        distiller = Distiller(model, teacher, distill, temperature=temperature,
                              alpha=alpha, features=features, hidden_loss=hidden_loss,
                              cache_bytes=cache_budget(teacher_cache, data, teacher))
    try:
        if distiller is not None:
            _prepare_distiller(model, distiller, data, train_bn)
        trained, history = _train(model, data, distiller, epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, nesterov=nesterov, schedule=schedule, warmup_steps=warmup_steps,
                      step_size=step_size, gamma=gamma, amp=amp, loss_fn=loss_fn, eval_data=eval_data,
                      clip_grad_norm=clip_grad_norm, progress=progress, on_step=on_step,
                      keep_sparsity=keep_sparsity, train_bn=train_bn, steps_per_epoch=steps_per_epoch,
                      lr_multipliers=lr_multipliers)
        history.teacher_cache_hits = distiller.cache_hits if distiller is not None else 0
        if source is not None and teacher is not source and isinstance(getattr(trained, "meta", None), dict):
            # trained on its own (or from another teacher), the model it was compiled from is no longer the
            # model it approximates: later distillation (finetune, gradual_prune) must not default to it
            trained.meta.pop("fxopt_source", None)
        return trained, history
    finally:
        if distiller is not None:
            distiller.remove()


def _loss(loss_fn: Callable, out: torch.Tensor, target: Any) -> torch.Tensor:
    try:
        return loss_fn(out, target)
    except (RuntimeError, IndexError, ValueError) as e:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise InputError(f"the loss cannot compare the model's output of shape {tuple(out.shape)} with targets of "
                         f"{shape}: {type(e).__name__}: {str(e).splitlines()[0][:200]} (labels beyond the number of "
                         "outputs? the wrong loss?)") from e


def _forward(model: torch.nn.Module, inputs: Any, where: str) -> Any:
    try:
        return _call(model, inputs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"the {where} does not run on a batch of the data: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}; check the batches' shapes and dtypes") from e


def _prepare_distiller(model: torch.nn.Module, distiller: Any, data: Iterable, train_bn: bool) -> None:
    """One forward pass of both models on the first batch: checks that the teacher's outputs match the
    student's and creates the projections, so that the optimizer sees them."""
    first = next(iter(_batches(data, 1, unlabeled=True)), None)
    if first is None:
        raise InputError("the fine-tuning data is empty")
    inputs = first[0]
    t_out, t_feats = distiller.teacher_outputs(lambda m: _forward(m, inputs, "teacher"))
    distiller.reset()
    with torch.no_grad():
        s_out = _forward(model, inputs, "student")
        distiller.loss(s_out, t_out, t_feats, token_mask(inputs))


def _train(model: torch.nn.Module, data: Iterable, distiller: Any, *, epochs: int, optimizer: str, lr: float,
           momentum: float, weight_decay: float, nesterov: bool, schedule: str, warmup_steps: int, step_size: int,
           gamma: float, amp: str | None, loss_fn: Callable, eval_data: Iterable | None,
           clip_grad_norm: float | None, progress: bool | None, on_step: Callable | None, keep_sparsity: bool,
           train_bn: bool, steps_per_epoch: int,
           lr_multipliers: dict | None = None) -> tuple[torch.nn.Module, FinetuneHistory]:
    extra = list(distiller.parameters()) if distiller is not None else []
    if lr_multipliers:
        import fnmatch
        by_mult: dict[float, list] = {}
        for name, p in model.named_parameters():
            m = next((float(v) for k, v in lr_multipliers.items() if name == k or fnmatch.fnmatchcase(name, k)), 1.0)
            by_mult.setdefault(m, []).append(p)
        groups = [{"params": ps, "lr_mult": m} for m, ps in by_mult.items()]
        if extra:  # distillation projections train at the base rate
            groups.append({"params": extra, "lr_mult": 1.0})
        opt = make_optimizer(groups, optimizer, lr, momentum, weight_decay, nesterov)
    else:
        opt = make_optimizer(list(model.parameters()) + extra, optimizer, lr, momentum, weight_decay, nesterov)
    total = steps_per_epoch * epochs if steps_per_epoch else epochs * 1000
    factor = make_schedule(schedule, total, steps_per_epoch or 1000, warmup_steps, step_size, gamma)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    use_scaler = amp == "fp16" and device.type == "cuda"
    if amp == "fp16" and not use_scaler:
        raise InputError("amp='fp16' needs a CUDA device (gradient scaling); on CPU use amp='bf16'")
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    from tqdm.auto import tqdm
    import sys
    show = sys.stderr.isatty() if progress is None else progress
    history = FinetuneHistory()
    step = 0
    model.train()
    if train_bn:
        _swap_bn(model, True)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        total_loss, seen, correct, counted = 0.0, 0, 0, 0
        parts_sum: dict[str, float] = {}
        epoch_steps = 0
        bar = tqdm(total=steps_per_epoch or None, desc=f"epoch {epoch}/{epochs}", disable=not show, leave=False)
        for i, (inputs, target) in enumerate(_batches(data, epoch, unlabeled=distiller is not None)):
            if distiller is not None:
                t_out, t_feats = distiller.teacher_outputs(lambda m: _forward(m, inputs, "teacher"),
                                                           key=(i, inputs) if epochs > 1 else None)
                distiller.reset()
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0) * factor(step)
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16) \
                if amp else _nullctx()
            with ctx:
                raw = _forward(model, inputs, "model")
                out = _logits(raw)
                value = None if target is None else _loss(loss_fn, out.float() if amp else out, target)
                if distiller is not None:
                    kd, parts = distiller.loss(raw, t_out, t_feats, token_mask(inputs))
                    value = kd if value is None else (1 - distiller.alpha) * value + distiller.alpha * kd
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v
            if not torch.isfinite(value.detach()):
                raise InputError(f"the loss became {float(value.detach())} at epoch {epoch}, step {step}; lower the "
                                 "learning rate or check the data for NaN/Inf")
            if scaler is not None:
                scaler.scale(value).backward()
                if clip_grad_norm:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                scaler.step(opt)
                scaler.update()
            else:
                try:
                    value.backward()
                except RuntimeError as e:
                    if "autograd formula" not in str(e) and "does not require grad" not in str(e):
                        raise
                    raise InputError(f"the model cannot be trained: {str(e).splitlines()[0][:200]}. A model lowered "
                                     "to integer kernels (fxopt.compile with int8/int4 recipes) has no gradients: "
                                     "fine-tune the float model (or the compile result of a float recipe), or use "
                                     "fxopt.qat to train with the quantization in the loop") from e
                if clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                opt.step()
            step += 1
            epoch_steps += 1
            if keep_sparsity:
                reapply_masks(model)
            if on_step is not None:
                on_step(step, model)
            n = len(target) if target is not None else len(out)
            total_loss += float(value.detach()) * n
            seen += n
            if target is not None and out.dim() == target.dim() + 1 and not target.is_floating_point():
                correct += int((out.detach().argmax(-1) == target).sum())
                counted += target.numel()
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
            bar.update(1)
        bar.close()
        if seen == 0:
            raise InputError("the fine-tuning data is empty")
        bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
        if bad is not None:   # the loss was finite, the step that followed was not
            raise InputError(f"parameter '{bad}' became NaN/Inf at epoch {epoch}; lower the learning rate (or set "
                             "clip_grad_norm=)")
        record = {"epoch": epoch, "loss": total_loss / seen, "lr": opt.param_groups[0]["lr"],
                  "seconds": time.perf_counter() - start}
        if counted:
            record["accuracy"] = 100.0 * correct / counted
        for k, v in parts_sum.items():
            record[k] = v / max(1, epoch_steps)
        if eval_data is not None:
            model.eval()
            _swap_bn(model, False)
            record["eval_loss"], acc = _evaluate(model, eval_data, loss_fn)
            if acc is not None:
                record["eval_accuracy"] = acc
            model.train()
            if train_bn:
                _swap_bn(model, True)
        history.epochs.append(record)
    history.steps = step
    _swap_bn(model, False)
    model.eval()
    return model, history


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _first_inputs(data: Iterable) -> tuple[tuple, dict]:
    """The first batch's inputs as ``(args, kwargs)``: of an ``(inputs, targets)`` pair, or the batch itself
    (inputs alone, as distillation takes them)."""
    first = next(iter(data))
    inputs = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else first
    if isinstance(inputs, dict):
        return (), inputs
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def gradual_prune(model: torch.nn.Module, data: Iterable, *, final_sparsity: float = 0.8, epochs: int = 4,
                  begin_epoch: int = 0, end_epoch: int | None = None, every: int = 10,
                  structured: bool = False, importance: str = "l1", reconstruct: bool = False,
                  **finetune_options: Any) -> tuple[torch.nn.Module, FinetuneHistory]:
    """Pruning interleaved with training on Zhu & Gupta's cubic schedule.

    Unstructured (default): every ``every`` steps, each conv/linear (output layer excepted) is
    magnitude-pruned to ``cubic_sparsity(step)``, rising from 0 at ``begin_epoch`` to
    ``final_sparsity`` at ``end_epoch`` (default: the last epoch), and training continues with
    the pruned weights held at zero.

    ``structured=True``: before each epoch from ``begin_epoch`` to ``end_epoch`` the model is
    recompiled with ``prune`` (``importance=``) so that ``cubic_sparsity(epoch)`` of the channels
    of every prunable group are gone, then fine-tuned one epoch: the model really shrinks step by
    step (``final_sparsity=0.5`` ends like ``prune-50``). Learning-rate schedules span one epoch.
    ``importance="activation"``/``"taylor"`` measure the channels on ``data`` at each step;
    ``reconstruct=True`` re-fits the layers reading pruned channels (``prune(reconstruct=true)``).
    With distillation (``distill=``), the teacher defaults to the model given (or, for a compiled
    one, the model it came from), not to each step's previous student.

    ``model`` may be a plain module (compiled first, on the first batch's inputs) or a compiled
    one. Other options go to :func:`finetune`.
    """
    from fxopt.ir.masks import set_sparsity
    if not 0 <= final_sparsity < 1:
        raise InputError(f"final_sparsity must be in [0, 1), got {final_sparsity}")
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError as e:
        raise InputError("gradual_prune needs data with a length (a list or a DataLoader)") from e
    if not steps_per_epoch:
        raise InputError("the fine-tuning data is empty")
    if structured:
        return _gradual_structured(model, data, final_sparsity, epochs, begin_epoch,
                                   epochs - 1 if end_epoch is None else end_epoch, importance, finetune_options,
                                   reconstruct)
    if reconstruct:
        raise InputError("reconstruct=True re-fits layers after channels are removed: it needs structured=True")
    if not any(n.endswith("_mask") for n, _ in model.named_buffers()):
        import fxopt  # the public API at call time (fxopt.api sits above this module)
        fxopt_compile = fxopt.compile
        args, kwargs = _first_inputs(data)
        model = fxopt_compile(model, args, kwargs, recipe="magnitude-prune(ratio=1e-12)")
    end = (epochs - 1 if end_epoch is None else end_epoch) * steps_per_epoch
    begin = begin_epoch * steps_per_epoch

    def hook(step: int, m: torch.nn.Module) -> None:
        if step % every == 0 or step >= end:
            set_sparsity(m, cubic_sparsity(step, final_sparsity, begin, end))
    user_hook = finetune_options.pop("on_step", None)

    def both(step: int, m: torch.nn.Module) -> None:
        hook(step, m)
        if user_hook is not None:
            user_hook(step, m)
    return finetune(model, data, epochs=epochs, on_step=both, **finetune_options)


def _gradual_structured(model: torch.nn.Module, data: Iterable, final: float, epochs: int, begin: int, end: int,
                        importance: str, options: dict, reconstruct: bool = False
                        ) -> tuple[torch.nn.Module, FinetuneHistory]:
    import fxopt  # the public API at call time (fxopt.api sits above this module)
    from fxopt.train.distill import source_of
    fxopt_compile = fxopt.compile
    args, kwargs = _first_inputs(data)
    if options.get("distill") and options.get("teacher") is None:
        # each step's student is compiled from the previous one: the teacher stays the original
        options = {**options, "teacher": source_of(model) or model}
    pairs = _has_pairs(data)
    history = FinetuneHistory()
    done = 0.0
    for epoch in range(epochs):
        target = cubic_sparsity(epoch, final, begin, end)
        if target > done + 1e-9:
            ratio = 1 - (1 - target) / (1 - done)   # of the channels still there
            calib = {"calibration": data, "calibration_inputs": 0 if pairs else None} \
                if importance in ("taylor", "activation") or reconstruct else {}
            step = f"prune(ratio={ratio:.6f},importance={importance}" + (",reconstruct=true)" if reconstruct else ")")
            model = fxopt_compile(model, args, kwargs, progress=False, recipe=f"canonicalize,{step},cleanup", **calib)
            done = target
        model, h = finetune(model, data, epochs=1, **options)
        for e in h.epochs:
            history.epochs.append({**e, "epoch": epoch + 1, "pruned": round(done, 4),
                                   "params": sum(p.numel() for p in model.parameters())})
        history.steps += h.steps
    return model, history

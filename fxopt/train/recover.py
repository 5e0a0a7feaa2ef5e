"""``fxopt.compile(..., recover={...})``: compress, then win the accuracy back, in one call.

    fxopt.compile(model, (x,), recipe="prune-50,int8", metric=accuracy,
                  recover={"data": loader, "epochs": 3, "distill": True, "qat": True})

The recipe is cut in two at its first quantization step (``fold-bn``, ``smooth-quant``,
``insert-qdq`` or ``cast`` after the compressing passes):

1. **compress**: the passes before the cut (pruning, sparsity, ...) run, and the result is
   fine-tuned on ``data``; with ``distill`` (default True) the uncompressed model is the teacher
   (logits for a classifier, whose batches carry integer labels; hidden states otherwise). Batch
   norms train here (they are folded in stage 2).
2. **quantize**: the rest of the recipe. With ``qat`` (default True) it is quantization-aware
   training (:func:`fxopt.qat`, distilled from the same teacher when ``distill``); without, the
   plain post-training quantization of the recovered model.

A stage that has nothing to recover (no compressing pass changed the model; no quantization in the
recipe) is skipped. ``metric`` (compile's argument) is evaluated after every stage; the history's
``stages`` (printed with it and shown in the report) has the metric, parameters, bytes, epochs and
seconds of each.

Keys of ``recover``: ``data`` (required: ``(inputs, targets)`` batches, or the inputs alone for
pure distillation), ``epochs`` (5), ``qat_epochs`` (default ``epochs``), ``distill`` (True, or a
mode ``"logits"``/``"hidden"``/``"both"``), ``qat`` (True), ``teacher`` (default: the model),
``reconstruct`` (True: where the recipe prunes with the default ``l1`` importance, it is also pruned the
data-aware way, ``prune(importance=activation, reconstruct=true)``, channels chosen by what they move on
``data`` and the layers reading them re-fitted, and the one whose outputs stay closer to the original's
on the first 8 batches is kept: the history's ``stages`` say which, with both errors; False keeps the
recipe's pruning as written), ``allocation`` (``"sensitivity"``: the data-aware prune also chooses how
much of each channel group goes from the measured damage of pruning it alone, ``prune(allocation=
sensitivity)``, removing at least as many parameters; ``"uniform"``: the same ratio everywhere),
``rebatch`` (``"auto"``: where the recipe compresses, a list of right-padded Hugging Face style token
batches is regrouped by sentence length, :func:`fxopt.train.batching.rebatch_by_length`, so that
training spends its time on real tokens rather than padding, 50% -> 1% of positions on
``bench/recover.py``'s corpus; the compressed graph is run on the narrowest and the smallest regrouped
batch first, and a graph that takes only the batches' own shapes keeps them; QAT and PTQ get the
batches as given (regrouped QAT is not measured yet); ``True`` insists, an error says why
it cannot; ``False`` trains on the batches as given), and
any :func:`fxopt.finetune` option (``lr``, ``optimizer``, ``alpha``, ``temperature``,
``features``, ...). The defaults: SGD with Nesterov momentum 0.9 at lr 0.05 on a cosine schedule,
distillation weight 0.5 at temperature 2 (``bench/recover.py`` measures them); for token batches
distilled on hidden states (a transformer encoder) AdamW at lr 5e-4 with the ``mse+cosine`` feature
loss (:data:`TOKEN_DEFAULTS`); QAT at a tenth of the learning rate. Options given in ``recover``
always win.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import torch

from fxopt.errors import InputError

__all__ = ["compile_and_recover", "RECOVER_DEFAULTS"]

RECOVER_DEFAULTS = {"epochs": 5, "distill": True, "qat": True, "reconstruct": True, "allocation": "sensitivity",
                    "rebatch": "auto", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                    "nesterov": True, "schedule": "cosine", "alpha": 0.5, "temperature": 2.0}
#: what changes where the data are token batches distilled on hidden states (a transformer encoder):
#: measured on the pretrained MiniLM after prune-50 (bench/recover.py), where SGD at 0.05 diverges and
#: AdamW at 5e-4 beat 1e-3 and 2e-3 (held-out mean cosine 0.9665 / 0.9643 / 0.9575 at 12 epochs)
TOKEN_DEFAULTS = {"optimizer": "adamw", "lr": 5e-4, "hidden_loss": "mse+cosine"}
_QUANT_STEPS = ("fold-bn", "smooth-quant", "insert-qdq", "cast")
_KEYS = {"data", "epochs", "qat_epochs", "distill", "qat", "teacher", "qat_lr", "reconstruct", "allocation", "rebatch"}


def _split(pipeline: Any) -> tuple[Any, Any]:
    """(compress, quantize): the steps before the first quantization step that follows every
    compressing pass, and the rest."""
    from fxopt.passmgr.pipeline import Pipeline
    from fxopt.train.qat import _flat_steps
    steps = _flat_steps(pipeline)
    last_compress = max((i for i, s in enumerate(steps) if getattr(s, "compresses", False)
                         and getattr(s, "name", "") not in ("insert-qdq", "cast")), default=-1)
    cut = next((i for i, s in enumerate(steps) if i > last_compress and getattr(s, "name", "") in _QUANT_STEPS),
               len(steps))
    return Pipeline(steps[:cut]), Pipeline(steps[cut:])


def _data_aware(pipeline: Any, allocation: str = "sensitivity") -> tuple[Any, bool]:
    """The pipeline with every ``prune`` step that uses the default ``l1`` importance switched to
    ``importance=activation, reconstruct=true`` (channels chosen, and their readers re-fitted, on the
    recovery data) and, with ``allocation="sensitivity"``, each group's ratio chosen from its measured
    damage (``prune(allocation=sensitivity)``; a ``scope=global`` prune keeps its scope), and whether any was."""
    import dataclasses

    from fxopt.passmgr.pipeline import Pipeline
    from fxopt.train.qat import _flat_steps
    steps, changed = [], False
    for s in _flat_steps(pipeline):
        cfg = getattr(s, "config", None)
        if getattr(s, "name", "") == "prune" and getattr(cfg, "importance", None) == "l1" \
                and not getattr(cfg, "reconstruct", True):
            alloc = allocation if cfg.scope == "local" else cfg.allocation
            s = type(s)(dataclasses.replace(cfg, importance="activation", reconstruct=True, allocation=alloc))
            changed = True
        steps.append(s)
    return Pipeline(steps), changed


def _output_error(m: torch.nn.Module, ref: torch.nn.Module, data: Any, batches: int = 8) -> float:
    """Mean squared difference of the main outputs over the first ``batches`` batches, relative to the
    reference's mean square (batches without a floating-point output are skipped)."""
    from fxopt.quant.calibrate import normalize_item
    from fxopt.train.distill import _first_tensor
    num = den = 0.0
    saved = {n: b.clone() for n, b in m.named_buffers()}   # a probe: batch-norm statistics must not move
    try:
        with torch.no_grad():
            for item in itertools.islice(data, batches):   # a DataLoader is not read to its end
                pair = isinstance(item, (tuple, list)) and len(item) == 2
                a, kw = normalize_item(item, 0 if pair else None)
                try:
                    want, got = _first_tensor(ref(*a, **kw)), _first_tensor(m(*a, **kw))
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    raise InputError(f"the model does not run on a batch of recover['data']: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300]}; check the batches' shapes and dtypes "
                                     "(the same as the example inputs)") from e
                if want is None or got is None or not want.is_floating_point():
                    continue
                num += float((got.float() - want.float()).pow(2).mean())
                den += float(want.float().pow(2).mean())
    finally:
        with torch.no_grad():
            for n, b in m.named_buffers():
                b.copy_(saved[n])
    return num / max(den, 1e-30)


def _token_batches(data: Any) -> bool:
    """Are the batches Hugging Face style token batches (dicts with a 2-D ``attention_mask``)?"""
    from fxopt.quant.calibrate import token_mask
    first = next(iter(data), None)
    return isinstance(first, dict) and token_mask(first) is not None


def _rebatched(data: Any, rebatch: Any, probe: torch.nn.Module | None = None) -> tuple[Any, dict]:
    """``(data, what was done)``: token batches regrouped by length (:mod:`fxopt.train.batching`) unless
    ``rebatch`` is False; ``True`` insists (an error says why the batches cannot be regrouped).
    ``probe``: the compressed graph, run on the narrowest and the smallest regrouped batch first (a
    graph captured with a fixed sequence length takes no other); where it fails the batches stay as given."""
    if rebatch is False:
        return data, {"rebatched": False, "why": "recover['rebatch'] is False"}
    from fxopt.train.batching import rebatch_by_length
    out, info = rebatch_by_length(data)
    why = None if info["rebatched"] else info["why"]
    if why is None and probe is not None:
        tries = {id(b): b for b in (min(out, key=lambda b: b["attention_mask"].shape[1]),
                                    min(out, key=lambda b: b["attention_mask"].shape[0]))}
        from fxopt.ir.graph_utils import preserved_state
        try:
            with torch.no_grad(), preserved_state(probe):   # a probe: no running statistic may move
                for b in tries.values():
                    probe(**b)
        except Exception as e:  # noqa: BLE001 - any failure: the model takes only the batches' own shapes
            why = (f"the compressed model does not run on a regrouped batch ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''})")
            info = {"rebatched": False, "why": why}
    if rebatch is True and why is not None:
        raise InputError(f"recover['rebatch']=True, but the batches cannot be regrouped by length: {why}; "
                         "pass rebatch='auto' (regroup where possible) or False")
    return (out, info) if why is None else (data, info)


def _calibration_of(data: Any) -> dict:
    """compile's calibration options that read the recovery batches' inputs (the first item of a pair)."""
    first = next(iter(data), None)
    return {"calibration": data, "calibration_inputs": 0 if isinstance(first, (tuple, list)) and len(first) == 2
            else None}


def _compressed(m: torch.nn.Module, pipeline: Any) -> bool:
    """Whether a compressing step of ``pipeline`` changed ``m`` (it ran and was not rolled back)."""
    from fxopt.train.qat import _flat_steps
    names = {getattr(s, "name", "") for s in _flat_steps(pipeline) if getattr(s, "compresses", False)}
    hist = getattr(m, "fxopt_history", None)
    return bool(names) and hist is not None and any(r.status == "changed" and r.name in names for r in hist.records)


def _closer_of(model, plain, compress, aware, data, fxopt_compile, args, kwargs, metric, compile_kwargs):
    """Prune again the data-aware way and keep whichever result stays closer to the original on the
    recovery data (relative output error): (model, pipeline, what was chosen and why)."""
    import copy

    from fxopt.ir.torch_compat import torch_internals
    cw = dict(compile_kwargs)
    if cw.get("calibration") is None:   # the recovery data measures the channels
        cw.update(_calibration_of(data))
    other = fxopt_compile(model, args, kwargs, recipe=aware, metric=metric, **cw)
    with torch_internals():   # the user's model is never run here: an eval-mode copy is the reference
        ref = copy.deepcopy(model).eval()
    errs = {"weights (l1)": _output_error(plain, ref, data), "activation + reconstruct": _output_error(other, ref, data)}
    # a prune that was rolled back left the model whole: "closest to the original", and not what was asked
    ran = {"weights (l1)": _compressed(plain, compress), "activation + reconstruct": _compressed(other, aware)}
    pick = min((k for k in errs if ran[k]), key=errs.get, default="weights (l1)")
    choice = {"chosen": pick, "output_error": {k: round(v, 6) for k, v in errs.items()},
              **({"rolled_back": [k for k in ran if not ran[k]]} if not all(ran.values()) else {})}
    return (other, aware, choice) if pick == "activation + reconstruct" else (plain, compress, choice)


def _what(pipeline: Any) -> str:
    """The compressing steps of a pipeline, as the history shows them (``prune(ratio=0.5)``)."""
    from fxopt.train.qat import _flat_steps
    steps = [str(s) for s in _flat_steps(pipeline) if getattr(s, "compresses", False)]
    return ", ".join(steps) or str(pipeline)


def _model_stats(m: torch.nn.Module) -> tuple[int, int]:
    hist = getattr(m, "fxopt_history", None)
    if hist is not None and hist.final_stats:
        return hist.final_stats.get("params"), hist.final_stats.get("model_bytes")
    params = sum(p.numel() for p in m.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    return params, nbytes


def run_metric(metric: Callable, module: torch.nn.Module) -> float:
    """The user's metric of ``module`` as a float; what it raises, or a non-number, is a clear InputError."""
    with torch.no_grad():
        try:
            value = metric(module)
        except Exception as e:
            raise InputError(f"the metric function raised {type(e).__name__}: {e}") from e
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"metric must return a number, got {type(value).__name__}") from e


def compile_and_recover(model: torch.nn.Module, args: Any, kwargs: dict | None, recipe: Any, recover: dict,
                        metric: Callable | None, compile_kwargs: dict) -> Any:
    """``fxopt.compile`` with a recovery schedule (see the module docstring)."""
    import fxopt  # the public API at call time (fxopt.api sits above this module)
    from fxopt.passmgr.pipeline import Pipeline
    from fxopt.train.qat import qat, _flat_steps
    from fxopt.train.training import _has_labels, finetune
    fxopt_compile, _run_metric = fxopt.compile, run_metric
    if not isinstance(recover, dict) or "data" not in recover:
        raise InputError("recover= takes a dict with at least 'data': recover={'data': loader, 'epochs': 3}")
    data = recover["data"]
    if data is None or (hasattr(data, "__len__") and len(data) == 0):
        raise InputError("recover['data'] is empty: pass the training batches")
    if iter(data) is data:
        raise InputError("recover['data'] is a one-shot iterator; pass a list or a DataLoader (it is read once per "
                         "epoch and per stage)")
    import inspect
    known = _KEYS | set(inspect.signature(finetune).parameters) - {"model", "data", "inplace"}
    unknown = sorted(set(recover) - known)
    if unknown:
        raise InputError(f"recover= does not know {', '.join(map(repr, unknown))}; it takes {', '.join(sorted(_KEYS))} "
                         "and fxopt.finetune's options (lr, optimizer, alpha, ...)")
    opts = {**RECOVER_DEFAULTS, **recover}
    epochs, qat_epochs = int(opts.pop("epochs")), opts.pop("qat_epochs", None)
    distill, use_qat = opts.pop("distill"), bool(opts.pop("qat"))
    reconstruct = bool(opts.pop("reconstruct"))
    allocation = opts.pop("allocation")
    if allocation not in ("sensitivity", "uniform"):
        raise InputError(f"recover['allocation'] must be 'sensitivity' or 'uniform', got {allocation!r}")
    rebatch = opts.pop("rebatch")
    if rebatch not in ("auto", True, False):
        raise InputError(f"recover['rebatch'] must be 'auto', True or False, got {rebatch!r}")
    teacher = opts.pop("teacher", None) or model
    qat_lr = opts.pop("qat_lr", None)
    opts.pop("data")
    if epochs < 1:
        raise InputError(f"recover['epochs'] must be >= 1, got {epochs}")
    if qat_epochs is not None and int(qat_epochs) < 1:
        raise InputError(f"recover['qat_epochs'] must be >= 1 (or left out: as many as 'epochs'), got {qat_epochs}")
    mode = None
    if distill:
        mode = distill if isinstance(distill, str) else ("logits" if _has_labels(data) else "hidden")
    if rebatch is True:   # insisted on: why it cannot be done comes before any work
        if not any(getattr(s, "compresses", False) for s in _flat_steps(_split(Pipeline(_flat_steps(recipe)))[0])):
            raise InputError("recover['rebatch']=True regroups the batches of the distillation after compressing; "
                             "this recipe does not compress (QAT trains on the batches as given)")
        _rebatched(data, rebatch)
    if mode == "hidden" and _token_batches(data):   # a transformer encoder: its measured defaults
        opts.update({k: v for k, v in TOKEN_DEFAULTS.items() if k not in recover})
    train_opts = {k: v for k, v in opts.items()}
    if mode is not None:
        train_opts.update(teacher=teacher, distill=mode)
    else:
        for k in ("alpha", "temperature"):
            train_opts.pop(k, None)
    progress = compile_kwargs.get("progress")
    pipeline = Pipeline(_flat_steps(recipe))
    compress, quantize = _split(pipeline)
    stages = []
    if metric is not None:  # on an eval-mode copy: the user's model (its mode, its running stats) stays as it is
        import copy

        from fxopt.ir.torch_compat import torch_internals
        with torch_internals():
            probe = copy.deepcopy(model).eval()
        stages.append({"stage": "original", "what": type(model).__name__, "metric": _run_metric(metric, probe),
                       "params": _model_stats(model)[0], "bytes": _model_stats(model)[1], "seconds": 0.0})
    start = time.perf_counter()
    choice = None
    batching = {"rebatched": False, "why": "no compressing stage"}
    fit_data = data
    if len(compress):
        current = fxopt_compile(model, args, kwargs, recipe=compress, metric=metric, **compile_kwargs)
        # regrouped by length where the compressed graph takes the regrouped shapes: the data-aware prune and
        # the distillation read them; QAT and PTQ keep the batches as given (calibration would take regrouped
        # batches where the graph's sequence length is symbolic; regrouped QAT is not measured yet)
        fit_data, batching = _rebatched(data, rebatch, current)
        aware, changed = _data_aware(compress, allocation) if reconstruct else (None, False)
        if changed:
            current, compress, choice = _closer_of(model, current, compress, aware, fit_data, fxopt_compile, args,
                                                   kwargs, metric, compile_kwargs)
    else:
        current = model
    first_hist = current.fxopt_history if len(compress) else None
    records = list(first_hist.records) if first_hist is not None else []
    compressed = len(compress) and _compressed(current, compress)
    if compressed:
        params, nbytes = _model_stats(current)
        stages.append({"stage": "compress", "what": _what(compress), "params": params, "bytes": nbytes,
                       "seconds": time.perf_counter() - start,
                       "metric": current.fxopt_history.metric["compiled"] if metric is not None else None,
                       **({"pruning": choice} if choice else {})})
        t0 = time.perf_counter()
        current, hist = finetune(current, fit_data, epochs=epochs, progress=progress, **train_opts)
        stages.append({"stage": "distill" if mode else "finetune", "what": f"{mode or 'labels'}, {epochs} epochs",
                       "epochs": hist.epochs, "params": params, "bytes": nbytes, "batching": batching,
                       "optimizer": f"{train_opts.get('optimizer')}, lr {train_opts.get('lr')}",
                       "seconds": time.perf_counter() - t0,
                       "metric": _run_metric(metric, current) if metric is not None else None})
    quant_steps = [getattr(s, "name", "") for s in _flat_steps(quantize)]
    if "insert-qdq" in quant_steps and use_qat:
        t0 = time.perf_counter()
        q_opts = {k: v for k, v in train_opts.items()}
        q_opts["lr"] = qat_lr if qat_lr is not None else float(train_opts.get("lr", 0.05)) / 10
        cal = compile_kwargs.get("calibration")
        extra = {k: v for k, v in compile_kwargs.items() if k not in ("progress", "calibration")}
        out = qat(current, args, data, kwargs=kwargs, recipe=quantize,
                  epochs=int(qat_epochs if qat_epochs is not None else epochs),
                  calibration=cal, metric=metric, progress=progress, compile_options=extra, **q_opts)
        qs = out.fxopt_history.stages[-1]
        qs["seconds"] = time.perf_counter() - t0
        stages.append(qs)
        out.fxopt_history.records = [*records, *out.fxopt_history.records]
    else:
        qw = dict(compile_kwargs)
        if len(quantize) and qw.get("calibration") is None:   # static ranges from the recovery data's inputs
            qw.update(_calibration_of(data))
        out = fxopt_compile(current, args, kwargs, recipe=quantize, metric=metric, **qw) \
            if len(quantize) else fxopt_compile(current, args, kwargs, recipe="cleanup", metric=metric,
                                                **compile_kwargs)
        if len(quantize):
            params, nbytes = _model_stats(out)
            stages.append({"stage": "quantize", "what": _what(quantize), "params": params, "bytes": nbytes,
                           "seconds": 0.0,
                           "metric": out.fxopt_history.metric["compiled"] if metric is not None else None})
        out.fxopt_history.records = [*records, *out.fxopt_history.records]
    hist = out.fxopt_history
    for i, r in enumerate(hist.records, 1):
        r.index = i
    hist.pipeline = str(pipeline)
    hist.stages = stages
    if len(compress):
        hist.initial, hist.initial_stats = first_hist.initial, first_hist.initial_stats
    if metric is not None and stages:
        hist.metric = {"name": getattr(metric, "__name__", "metric"), "original": stages[0]["metric"],
                       "compiled": stages[-1]["metric"]}
    import weakref
    out.meta["fxopt_source"] = weakref.ref(model)
    return out

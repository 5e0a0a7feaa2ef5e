"""Calibration: run data through a graph and let observers record activation ranges.

Each item of the calibration iterable is what the model is called with: a tensor, a
tuple/list of positional inputs, or a dict of keyword inputs. A DataLoader of
``(inputs, target)`` pairs works with ``inputs=0`` (take item 0), ``inputs="x"`` (a
key) or ``inputs=callable``. Bad data gets a :class:`~fxopt.errors.CalibrationError`
that says what was wrong: an empty iterable, NaN/Inf inputs or activations, batches
whose rank, dtype or fixed sizes differ from the example inputs.

    >>> import torch, fxopt
    >>> gm = fxopt.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> ranges = fxopt.calibrate(gm, [torch.randn(8, 4) for _ in range(3)])
    >>> print(ranges.table().splitlines()[0])
    node                           batches         min         max
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx

from fxopt.errors import CalibrationError, mark_user_error
from fxopt.quant.observers import Observer, make_observer
from fxopt.quant.qspec import QSpec

__all__ = ["calibrate", "iter_calibration", "CalibrationRanges", "observe", "Inputs", "normalize_item",
           "token_mask"]


class Inputs:
    """One calibration item given as positional and keyword inputs together."""

    def __init__(self, args: tuple = (), kwargs: dict | None = None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})


def token_mask(kwargs: Any) -> torch.Tensor | None:
    """The ``[batch, seq]`` boolean mask of real tokens of a Hugging Face style batch (keyword inputs with a
    2-D ``attention_mask`` of integers, booleans, or floats that are all 0 or 1), or None: padding positions
    are left out of what is measured or trained on them."""
    am = kwargs.get("attention_mask") if isinstance(kwargs, dict) else None
    if not isinstance(am, torch.Tensor) or am.dim() != 2:
        return None
    if am.is_floating_point() and not bool(((am == 0) | (am == 1)).all()):
        return None   # an additive mask (0 / -inf): not a keep-mask
    return am.bool()


def normalize_item(item: Any, inputs: Any = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one calibration item (``inputs`` picks them from a pair, see the module docs)."""
    if isinstance(item, Inputs):
        return item.args, item.kwargs
    if inputs is not None:
        try:
            item = inputs(item) if callable(inputs) else item[inputs]
        except (KeyError, IndexError, TypeError) as e:
            raise CalibrationError(f"inputs={inputs!r} cannot pick the model inputs from a calibration item of "
                                   f"type {type(item).__name__}: {e}") from e
        except Exception as e:  # the user's own inputs= function failed: theirs to see, not a pass bug
            raise mark_user_error(e)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"a calibration item must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                           f"got {type(item).__name__}; for (inputs, target) pairs pass inputs=0")


def _describe(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_like(i: int, args: tuple, kwargs: dict, example: tuple[tuple, dict] | None,
                takes: Callable[[tuple, dict], bool] | None = None) -> None:
    """NaN/Inf, and the example's structure, ranks, dtypes and shapes beyond the batch dim; where the graph
    takes other sizes (``takes``: a graph captured with a symbolic sequence length), those pass too."""
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    for t in flat:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(f"calibration batch {i} holds NaN or Inf; clean the data first")
    if example is None:
        return
    ex_args, ex_kwargs = example
    if len(args) != len(ex_args) or set(kwargs) != set(ex_kwargs):
        raise CalibrationError(f"calibration batch {i} has {len(args)} positional / {sorted(kwargs)} keyword inputs; "
                               f"the example inputs have {len(ex_args)} / {sorted(ex_kwargs)}. For (inputs, target) "
                               "pairs pass inputs=0")
    pairs = list(zip(args, ex_args)) + [(kwargs[k], ex_kwargs[k]) for k in ex_kwargs]
    other = None  # the first input whose sizes beyond the batch dim differ from the example's
    for got, want in pairs:
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.dim() != want.dim() or got.dtype != want.dtype:
                raise CalibrationError(f"calibration batch {i}: an input is {_describe(got)}, the example input is "
                                       f"{_describe(want)} (rank and dtype must match)")
            if other is None and got.shape[1:] != want.shape[1:] and got.dim() > 1:
                other = (got, want)
    if other is not None and not (takes is not None and takes(args, kwargs)):
        got, want = other
        raise CalibrationError(f"calibration batch {i}: input of shape {tuple(got.shape)} does not match the "
                               f"example's {tuple(want.shape)} beyond the batch dimension, and the graph "
                               "takes only those sizes (compile with dynamic=... to make a dim symbolic)")


def iter_calibration(data: Iterable, *, inputs: Any = None, example: tuple[tuple, dict] | None = None,
                     max_batches: int | None = None, progress: bool | None = None,
                     desc: str = "fxopt: calibrate",
                     takes: Callable[[tuple, dict], bool] | None = None) -> Iterator[tuple[int, tuple, dict]]:
    """Validated ``(index, args, kwargs)`` per calibration item, with a progress bar. ``takes(args, kwargs)``:
    does the graph accept a batch whose shapes differ from the example's beyond the batch dim?"""
    import sys

    from tqdm.auto import tqdm
    if data is None or isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise CalibrationError(f"calibration data must be an iterable of model inputs (a list of tensors, a "
                               f"DataLoader ...), got {type(data).__name__}"
                               + ("; wrap a single batch in a list: [x]" if isinstance(data, torch.Tensor) else ""))
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if max_batches:
        total = min(total, max_batches) if total is not None else max_batches
    show = sys.stderr.isatty() if progress is None else bool(progress)
    seen = 0
    with tqdm(total=total, desc=desc, unit=" batch", disable=not show, leave=False) as bar:
        for i, item in enumerate(_users(data)):
            if max_batches and i >= max_batches:
                break
            args, kwargs = normalize_item(item, inputs)
            _check_like(i, args, kwargs, example, takes)
            yield i, args, kwargs
            seen += 1
            bar.update(1)
    if seen == 0:
        raise CalibrationError("the calibration data is empty: pass an iterable with at least one batch of "
                               "representative inputs (a few hundred samples is typical)")


def _users(data: Iterable) -> Iterator:
    """Iterate the user's data; an exception their iterable raises is tagged as theirs (never hidden)."""
    try:
        it = iter(data)
    except Exception as e:
        raise mark_user_error(e)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise mark_user_error(e)
        yield item


class _Tap:
    """A graph node calls this with a tensor; it feeds the observer."""

    def __init__(self, observer: Observer, name: str):
        self.observer, self.name = observer, name
        self.__name__ = f"observe_{name}"

    def __call__(self, x: torch.Tensor) -> None:
        try:
            self.observer.update(x)
        except CalibrationError as e:
            raise CalibrationError(f"{e} (at node '{self.name}')") from None


def graph_takes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Does the captured graph accept this call (its symbolic dims may take other sizes than the example's)?"""
    from fxopt.errors import InputError
    from fxopt.ir.input_guard import check_call
    if getattr(gm, "_in_spec", None) is None:
        return False  # nothing captured to check against: keep the example's shapes
    try:
        check_call(gm, args, kwargs)
    except InputError:
        return False
    return True


def observe(gm: fx.GraphModule, observers: dict[fx.Node, Observer], data: Iterable, *, inputs: Any = None,
            example: tuple[tuple, dict] | None = None, max_batches: int | None = None,
            progress: bool | None = None) -> int:
    """Run ``data`` through ``gm`` feeding ``observers[node]`` with each node's value.

    Observer taps are added to the graph for the run and removed afterwards (also on
    error). Returns the number of batches.
    """
    taps = []
    for node, obs in observers.items():
        with gm.graph.inserting_after(node):
            taps.append(gm.graph.call_function(_Tap(obs, node.name), (node,)))
    gm.recompile()
    from fxopt.ir.graph_utils import preserved_state
    n = 0
    try:
        with torch.no_grad(), preserved_state(gm):
            for i, args, kwargs in iter_calibration(data, inputs=inputs, example=example, max_batches=max_batches,
                                                    progress=progress, takes=lambda a, k: graph_takes(gm, a, k)):
                try:
                    gm(*args, **kwargs)
                except CalibrationError:
                    raise
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} fails in the model: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:300]}") from e
                n += 1
    finally:
        for t in taps:
            gm.graph.erase_node(t)
        gm.recompile()
    return n


class CalibrationRanges(dict):
    """node name -> Observer, with ``table()``."""

    def table(self) -> str:
        lines = [f"{'node':<30} {'batches':>7} {'min':>11} {'max':>11}"]
        for name, obs in self.items():
            lo, hi = obs.range()
            lines.append(f"{name[:30]:<30} {obs.batches:>7} {float(lo.min()):>11.4g} {float(hi.max()):>11.4g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def calibrate(gm: fx.GraphModule, data: Iterable, *, nodes: Iterable[str] | None = None,
              spec: str | QSpec = "uint8/tensor", inputs: Any = None, max_batches: int | None = None,
              progress: bool | None = None) -> CalibrationRanges:
    """Record the ranges of activations of a captured graph over ``data``.

    ``nodes``: names of the nodes to observe (default: the inputs of every linear,
    convolution and matmul). ``spec``: the observer and granularity (default per-tensor
    min/max; ``"uint8/tensor/percentile"``, ``"int8/channel/axis-1"`` ...). Returns a
    mapping node name -> observer (``.range()``, ``.qparams()``); ``.table()`` prints it.
    Passes use :func:`observe` directly; ``compile(..., calibration=data)`` calibrates
    for the quantization recipes.
    """
    from fxopt.ir.dialect import is_conv, is_linear, is_matmul
    if not isinstance(gm, fx.GraphModule):
        raise CalibrationError("fxopt.calibrate works on a captured graph: gm = fxopt.trace(model, example_inputs)")
    spec = QSpec.parse(spec)
    by_name = {n.name: n for n in gm.graph.nodes}
    if nodes is None:
        watch = []
        for n in gm.graph.nodes:
            if (is_linear(n) or is_conv(n) or is_matmul(n)) and isinstance(n.args[0], fx.Node):
                if n.args[0] not in watch:
                    watch.append(n.args[0])
    else:
        missing = [m for m in nodes if m not in by_name]
        if missing:
            raise CalibrationError(f"no node named {missing[0]!r} in the graph (fxopt.summary(gm) lists them)")
        watch = [by_name[m] for m in nodes]
    observers = {n: make_observer(spec) for n in watch}
    example = gm.meta.get("fxopt_example_inputs")
    observe(gm, observers, data, inputs=inputs, example=example, max_batches=max_batches, progress=progress)
    return CalibrationRanges({n.name: o for n, o in observers.items()})

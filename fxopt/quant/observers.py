"""Observers: they watch tensors during calibration and choose scales and zero points.

* ``minmax``: the running minimum and maximum;
* ``moving-average``: an exponential moving average of each batch's min and max
  (``momentum``), less sensitive to one extreme batch;
* ``percentile``: the ``percentile`` / ``100 - percentile`` quantiles of a bounded,
  deterministic sample of the values, clipping rare outliers;
* ``mse``: searches the clipping range that minimizes the mean squared
  quantize-dequantize error over the same sample (for weights: over the weights).

Each works per tensor or per channel (``QSpec.granularity``); weights also per group
(:func:`weight_qparams`). Dynamic (``token``) specs need no observer: their scales are
computed at run time.

    >>> import torch
    >>> from fxopt.quant.observers import make_observer
    >>> from fxopt.quant.qspec import QSpec
    >>> obs = make_observer(QSpec.parse("uint8/tensor"))
    >>> obs.update(torch.tensor([-1.0, 3.0]))
    >>> scale, zp = obs.qparams()
    >>> round(float(scale), 4), int(zp)
    (0.0157, 64)
"""
from __future__ import annotations

import torch

from fxopt.errors import CalibrationError
from fxopt.quant.qspec import QSpec, dequantize, qparams_from_range, quantize

__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver", "MSEObserver",
           "make_observer", "weight_qparams", "SAMPLE_PER_BATCH"]

#: values kept per calibration batch by the percentile and MSE observers
SAMPLE_PER_BATCH = 1 << 15
_MAX_SAMPLE = 1 << 20


def _reduce(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().float()
    if spec.granularity == "channel":
        flat = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
        return flat.amin(1), flat.amax(1)
    return x.min(), x.max()


class Observer:
    """Base class: ``update(x)`` during calibration, then ``qparams()`` -> (scale, zero_point)."""

    def __init__(self, spec: QSpec):
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            return
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError("an activation holds NaN or Inf during calibration; check the calibration "
                                   "inputs (and the model on them): quantization ranges cannot be chosen")
        lo, hi = _reduce(x, self.spec)
        self._update_range(lo, hi)
        self._observe(x)
        self.batches += 1

    def _update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            if self.lo.shape != lo.shape:
                raise CalibrationError(f"a tensor changed its channel count during calibration "
                                       f"({tuple(self.lo.shape)} -> {tuple(lo.shape)})")
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise CalibrationError("an observer saw no data: the calibration data never reached this layer")
        return self.lo, self.hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.spec)


class MinMaxObserver(Observer):
    """The running min and max."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min/max: ``r = (1 - momentum) * r + momentum * batch``."""

    def __init__(self, spec: QSpec, momentum: float = 0.1):
        super().__init__(spec)
        self.momentum = momentum

    def _update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi


class _Sampling(Observer):
    """Keeps up to :data:`SAMPLE_PER_BATCH` values per batch (fixed-seed subsample: deterministic)."""

    def __init__(self, spec: QSpec):
        super().__init__(spec)
        if spec.granularity != "tensor":
            raise CalibrationError(f"the {type(self).__name__} works per tensor; use minmax for per-channel "
                                   "activation ranges")
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self._gen = torch.Generator().manual_seed(0)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten()
        if flat.numel() > SAMPLE_PER_BATCH:
            idx = torch.randint(0, flat.numel(), (SAMPLE_PER_BATCH,), generator=self._gen)
            flat = flat[idx]
        if self.kept < _MAX_SAMPLE:
            self.samples.append(flat.clone())
            self.kept += flat.numel()

    def sample(self) -> torch.Tensor:
        self.range()
        return torch.cat(self.samples)


class PercentileObserver(_Sampling):
    """Clips to the ``percentile`` (upper) and ``100 - percentile`` (lower) quantiles of the values seen."""

    def __init__(self, spec: QSpec, percentile: float = 99.99):
        super().__init__(spec)
        if not 50 < percentile <= 100:
            raise CalibrationError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample()
        q = torch.quantile(s, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        return qparams_from_range(q[0], q[1], self.spec)


def _mse_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec, steps: int = 40,
                group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best of ``steps`` shrunken ranges ``[a*lo, a*hi]``, a in [0.3, 1], by quantization MSE.

    ``x`` is ``[C, n]`` (one row per scale; C may be 1) and ``lo``/``hi`` have shape ``[C]``.
    """
    best_err = torch.full(lo.shape, float("inf"))
    best = qparams_from_range(lo, hi, spec)
    for a in torch.linspace(1.0, 0.3, steps):
        scale, zp = qparams_from_range(lo * a, hi * a, spec)
        err = (dequantize(quantize(x, scale[:, None], zp[:, None], spec.qmin, spec.qmax),
                          scale[:, None], zp[:, None]) - x).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
    return best


class MSEObserver(_Sampling):
    """Chooses the clipping range with the least quantization MSE over the sampled values."""

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample()
        lo, hi = self.range()
        scale, zp = _mse_search(s[None], lo.reshape(1), hi.reshape(1), self.spec)
        return scale[0], zp[0]


_KINDS = {"minmax": MinMaxObserver, "moving-average": MovingAverageObserver,
          "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(spec: QSpec, **options: float) -> Observer:
    """The observer ``spec.observer`` names, for an activation with this spec."""
    if spec.dynamic:
        raise CalibrationError(f"{spec} is dynamic: its scales are computed at run time, no observer needed")
    if spec.granularity == "group":
        raise CalibrationError("group-wise scales are for weights (fxopt.quant.observers.weight_qparams)")
    return _KINDS[spec.observer](spec, **options)


def weight_qparams(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for a weight, shaped to broadcast against it.

    ``tensor``: scalars; ``channel``: size ``C`` on ``spec.axis`` and 1 elsewhere;
    ``group``: ``[..., K // group_size]`` (use with ``group_size``). Observers ``minmax``
    and ``mse`` apply (``percentile``/``moving-average`` mean nothing for a fixed tensor
    and act as ``minmax``).
    """
    w = w.detach().float()
    if spec.granularity == "group":
        if w.shape[-1] % spec.group_size:
            raise CalibrationError(f"weight of shape {tuple(w.shape)}: last dim is not a multiple of the "
                                   f"group size {spec.group_size}")
        rows = w.reshape(-1, spec.group_size)
        shape = (*w.shape[:-1], w.shape[-1] // spec.group_size)
    elif spec.granularity == "channel":
        rows = w.movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1)
        shape = tuple(w.shape[spec.axis] if d == spec.axis % w.dim() else 1 for d in range(w.dim()))
    elif spec.granularity == "tensor":
        rows, shape = w.reshape(1, -1), ()
    else:
        raise CalibrationError(f"weights cannot be quantized per {spec.granularity}")
    lo, hi = rows.amin(1), rows.amax(1)
    if spec.observer in ("mse", "gptq"):  # gptq picks codes with a Hessian (fxopt.quant.gptq); alone, mse
        scale, zp = _mse_search(rows, lo, hi, spec)
    else:
        scale, zp = qparams_from_range(lo, hi, spec)
    return scale.reshape(shape), zp.reshape(shape)

"""Checks of the ``fxopt`` command's arguments that need no model (paths, shapes, dtypes), run before
anything heavy loads, so a typo fails in a second with a clear :class:`~fxopt.errors.InputError`."""
from __future__ import annotations

import argparse

__all__ = ["preflight"]

_SHAPE = r"^\s*\d+(x\d+)*\s*(,\s*\d+(x\d+)*\s*)*$"
_DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "int64", "long", "int32", "uint8")


def _writable(flag: str, path: str | None, suffix: str = "") -> None:
    """An output path that can be written, checked before any model is loaded."""
    import os
    from fxopt.errors import InputError
    if not path:
        return
    if suffix and not path.endswith(suffix):
        raise InputError(f"{flag} {path}: use a {suffix} file name, e.g. {flag} model{suffix}")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a directory; give a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable here; choose another place")


def _readable(flag: str, path: str | None) -> None:
    import os
    from fxopt.errors import InputError
    if path and not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")


def preflight(ns: argparse.Namespace) -> None:
    """Check the arguments that need no model (paths, shapes, dtypes) before anything heavy loads."""
    import os
    import re
    from fxopt.errors import InputError
    spec = getattr(ns, "model", None) if ns.command in ("compile", "inspect", "sensitivity", "export") else None
    if spec:
        if spec.startswith("hf:"):
            if not os.path.isdir(spec[3:]):
                raise InputError(f"MODEL {spec}: {spec[3:]} is not a directory (hf: takes a local transformers model folder)")
        elif spec.endswith(".fxopt"):
            _readable("MODEL", spec)
        elif ":" in spec and spec.rpartition(":")[0].endswith(".py"):
            _readable("MODEL", spec.rpartition(":")[0])
        elif not spec.startswith("torchvision:"):
            raise InputError(f"cannot understand MODEL '{spec}': use path/to/file.py:NAME, torchvision:NAME, "
                             "hf:LOCAL_DIR or a .fxopt file")
    shape = getattr(ns, "input_shape", None)
    if shape and not re.match(_SHAPE, shape):
        raise InputError(f"bad --input-shape '{shape}': write sizes joined by x, e.g. 1x3x224x224, and separate "
                         "several inputs with commas")
    if getattr(ns, "dtype", None) and ns.dtype not in _DTYPE_NAMES:
        raise InputError(f"unknown --dtype '{ns.dtype}'; use one of {', '.join(sorted(_DTYPE_NAMES))}")
    for flag in ("example", "calibration"):
        _readable(f"--{flag}", getattr(ns, flag, None))
    if ns.command == "compile":
        _writable("--out", ns.out, ".fxopt")
    if ns.command == "export":
        _writable("--onnx", ns.onnx, ".onnx")
    for flag in ("report", "svg", "dot"):
        _writable(f"--{flag}", getattr(ns, flag, None))
    for flag in ("batch", "seq_len", "calibration_batches", "repeats"):
        v = getattr(ns, flag, None)
        if v is not None and v < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")

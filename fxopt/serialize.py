"""``fxopt.save`` / ``fxopt.load``: a file format that never unpickles code.

A ``.fxopt`` file is a zip archive with two members:

* ``manifest.json``: format name and version, the torch version, the SHA-256
  of the model archive, the pipeline and the per-pass table of the run;
* ``model.pt2``: the compiled module re-exported with ``torch.export`` and
  written by ``torch.export.save`` (graph as JSON, weights as raw bytes).

Before handing ``model.pt2`` to ``torch.export.load`` the loader checks the
checksum and refuses archives that would need pickle: weights or constants
marked ``use_pickle``, custom objects, or sample inputs that do not load with
``weights_only=True``. A truncated, tampered or foreign file raises
:class:`~fxopt.errors.LoadError` with what was wrong.

Example::

    >>> import torch, fxopt, tempfile, os
    >>> m = fxopt.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.fxopt")
    >>> fxopt.save(m, path)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(fxopt.load(path)(x), m(x))
    True
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any

import torch
import torch.fx as fx

from .capture import dynamic_shapes_for, install_input_guard, normalize_inputs
from .errors import InputError, LoadError

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "fxopt"
VERSION = 1
_MANIFEST = "manifest.json"
_MODEL = "model.pt2"


def _export(gm: fx.GraphModule, example_inputs: Any) -> Any:
    capture = gm.meta.get("fxopt_capture", {})
    if example_inputs is None:
        example_inputs = gm.meta.get("fxopt_example_inputs")
    if example_inputs is None:
        raise InputError("fxopt.save needs example inputs for a module that fxopt did not capture: "
                         "fxopt.save(module, path, example_inputs=((x,), {}))")
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        args, kwargs = normalize_inputs(*example_inputs)
    else:
        args, kwargs = normalize_inputs(example_inputs)
    dyn = dynamic_shapes_for(gm, args, kwargs, capture.get("dynamic"))
    try:
        if dyn is not None:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                return torch.export.export(gm, args, kwargs, dynamic_shapes=dyn, strict=False)
        return torch.export.export(gm, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:
        raise InputError(f"cannot export the module for saving: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def save(module: torch.nn.Module, path: str | os.PathLike, example_inputs: Any = None) -> None:
    """Write ``module`` (from ``fxopt.compile`` or ``fxopt.trace``) to ``path``.

    ``example_inputs`` (``(args, kwargs)``) is only needed for modules fxopt
    did not capture. The file is written atomically.
    """
    if not isinstance(module, fx.GraphModule):
        raise InputError(f"fxopt.save expects a module returned by fxopt.compile or fxopt.trace, got "
                         f"{type(module).__name__}; compile it first")
    ep = _export(module, example_inputs)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    blob = buf.getvalue()
    history = getattr(module, "fxopt_history", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "sha256": {_MODEL: hashlib.sha256(blob).hexdigest()},
        "pipeline": history.pipeline if history is not None else None,
        "history": history.table() if history is not None else None,
        "capture": {k: v for k, v in module.meta.get("fxopt_capture", {}).items()
                    if k in ("dynamic", "model_class", "range_constraints") and _jsonable(v)},
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fxopt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(_MANIFEST, json.dumps(manifest, indent=1))
            z.writestr(_MODEL, blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _check_no_pickle(blob: bytes) -> None:
    try:
        inner = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile as e:
        raise LoadError(f"the model archive inside is not a valid pt2 archive ({e})") from e
    for name in inner.namelist():
        if name.endswith("_config.json"):
            try:
                config = json.loads(inner.read(name)).get("config", {})
            except (ValueError, AttributeError) as e:
                raise LoadError(f"unreadable tensor table {name} in the model archive") from e
            for key, entry in config.items():
                if not isinstance(entry, dict) or entry.get("use_pickle", False):
                    raise LoadError(f"the model archive stores '{key}' with pickle; fxopt refuses to load "
                                    "files that could run code. Re-save it with fxopt.save")
        low = name.lower()
        if "custom_obj" in low or low.endswith(".pkl"):
            raise LoadError(f"the model archive contains {name}, a pickled object; fxopt refuses to "
                            "load files that could run code")
        if "sample_inputs" in name:
            data = inner.read(name)
            if data:
                try:
                    torch.load(io.BytesIO(data), weights_only=True)
                except Exception as e:
                    raise LoadError(f"{name} in the model archive needs unsafe unpickling; refusing it") from e


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a file written by :func:`save`; outputs are bit-identical to the saved module's."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoadError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if _MANIFEST not in names or _MODEL not in names:
                raise LoadError(f"{path} is a zip file but not an fxopt model (no {_MANIFEST}/{_MODEL}); "
                                "load it with the tool that wrote it")
            try:
                manifest = json.loads(z.read(_MANIFEST))
            except ValueError as e:
                raise LoadError(f"{path}: the manifest is not valid JSON (file corrupted?)") from e
            blob = z.read(_MODEL)
    except zipfile.BadZipFile as e:
        raise LoadError(f"{path} is not an fxopt file, or it is truncated or corrupted ({e}); "
                        "save the model again with fxopt.save") from e
    except (OSError, EOFError) as e:
        raise LoadError(f"cannot read {path}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise LoadError(f"{path} is not an fxopt model file (format={manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise LoadError(f"{path} was written by file format version {manifest.get('version')}, this fxopt "
                        f"reads version {VERSION}; upgrade fxopt or re-save the model")
    want = (manifest.get("sha256") or {}).get(_MODEL)
    if want != hashlib.sha256(blob).hexdigest():
        raise LoadError(f"{path} failed its checksum: the model data was modified or damaged after saving; "
                        "save the model again")
    _check_no_pickle(blob)
    try:
        ep = torch.export.load(io.BytesIO(blob))
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            ep = ep.run_decompositions({})
        gm = ep.module()
        install_input_guard(gm)
    except Exception as e:
        raise LoadError(f"{path}: torch could not rebuild the model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it may need a newer torch "
                        f"(saved with {manifest.get('torch')}, running {torch.__version__}) or "
                        "`import fxopt` kernels it uses") from e
    gm.meta["fxopt_capture"] = {**manifest.get("capture", {}), "front_end": "fxopt.load"}
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        gm.meta["fxopt_example_inputs"] = (tuple(example[0]), dict(example[1]))
    gm.meta["fxopt_manifest"] = manifest
    return gm

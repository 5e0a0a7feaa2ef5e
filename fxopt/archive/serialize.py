"""``fxopt.save`` / ``fxopt.load``: a file format that never unpickles code.

A ``.fxopt`` file is a zip archive with two members:

* ``manifest.json``: format name and version, the torch version, the SHA-256
  of the model archive, the pipeline and the per-pass table of the run;
* ``model.pt2``: the compiled module re-exported with ``torch.export`` and
  written by ``torch.export.save`` (graph as JSON, weights as raw bytes).

Before handing ``model.pt2`` to ``torch.export.load`` the loader checks both
zip archives, the manifest, the checksum, the payload tables, the sample
inputs and the graph against whitelists of what ``fxopt.save`` writes
(:mod:`fxopt.archive.archive_check`, :mod:`fxopt.archive.graph_check`), so loading never
unpickles or evaluates anything from the file. The SHA-256 in the manifest
catches accidents (a truncated or damaged file), not forgery: anyone can
recompute it; the whitelists are what stop a crafted file. A truncated,
tampered, crafted or foreign file raises :class:`~fxopt.errors.LoadError`
with what was wrong and what to do.

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
import re
import tempfile
import zipfile
from typing import Any

import torch
import torch.fx as fx

from fxopt.archive.archive_check import DAMAGED, MAX_TOTAL, RESAVE, check_model_archive, read_checked_zip, read_member
from fxopt.ir.capture import dynamic_shapes_for, example_call, install_input_guard
from fxopt.ir.torch_compat import torch_internals
from fxopt.ir.capture_rewrites import stride_safe_views
from fxopt.ir.input_guard import SIGNATURE_KEY
from fxopt.errors import InputError, LoadError

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "fxopt"
VERSION = 1
_MANIFEST = "manifest.json"
_MODEL = "model.pt2"
_RUNTIME_ONNX = "runtime.onnx"  # the ONNX model a RuntimeModule runs (fxopt.runtime.artifact)


def _export(gm: fx.GraphModule, example_inputs: Any) -> Any:
    capture = gm.meta.get("fxopt_capture", {})
    args, kwargs = example_call(gm, example_inputs, "fxopt.save")
    dyn = dynamic_shapes_for(gm, args, kwargs, capture.get("dynamic"))
    try:
        with torch_internals():
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
    from fxopt.runtime.engines import RuntimeModule
    runtime = None
    if isinstance(module, RuntimeModule):
        if module.artifact is None:
            import warnings
            warnings.warn(f"fxopt.save: runtime '{module.runtime}' has no file to keep; saving fxopt's graph (load "
                          "it and compile with runtime= again)", RuntimeWarning, stacklevel=2)
        else:
            rec = (module.fxopt_history.runtime or {}) if module.fxopt_history is not None else {}
            runtime = {"name": module.runtime, "artifact": module.artifact,
                       "tolerance": rec.get("tolerance"), "median_tolerance": rec.get("median_tolerance")}
        module = module.graph_module
    if not isinstance(module, fx.GraphModule):
        raise InputError(f"fxopt.save expects a module returned by fxopt.compile or fxopt.trace, got "
                         f"{type(module).__name__}; compile it first")
    ep = _export(module, example_inputs)
    buf = io.BytesIO()
    with torch_internals():
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
        "capture": {**{k: v for k, v in module.meta.get("fxopt_capture", {}).items()
                       if k in ("dynamic", "model_class", "range_constraints") and _jsonable(v)},
                    # forward's parameter names: positional calls map to keyword inputs after loading too
                    "signature": [[str(n), bool(d)] for n, d in module.meta.get(SIGNATURE_KEY) or []]},
    }
    if runtime is not None:
        manifest["sha256"][_RUNTIME_ONNX] = hashlib.sha256(runtime["artifact"]).hexdigest()
        manifest["runtime"] = {"name": runtime["name"], "tolerance": runtime["tolerance"],
                               "median_tolerance": runtime["median_tolerance"]}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fxopt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(_MANIFEST, json.dumps(manifest, indent=1))
            z.writestr(_MODEL, blob)
            if runtime is not None:
                z.writestr(_RUNTIME_ONNX, runtime["artifact"])
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


_MAX_MANIFEST = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,), "version": (int,), "torch": (str,), "sha256": (dict,), "pipeline": (str, type(None)),
    "history": (str, type(None)), "capture": (dict, type(None)), "runtime": (dict, type(None))}
_CAPTURE_TYPES: dict[str, tuple[type, ...]] = {
    "dynamic": (bool, str, type(None)), "model_class": (str, type(None)), "range_constraints": (dict,),
    "signature": (list,)}


def _outer_cap(name: str) -> int | None:
    return {_MANIFEST: _MAX_MANIFEST, _MODEL: MAX_TOTAL, _RUNTIME_ONNX: MAX_TOTAL}.get(name)


def _read(path: str) -> tuple[Any, bytes, bytes | None]:
    """The manifest (parsed JSON), the model archive's bytes and the runtime's ONNX bytes (or None),
    after the outer zip's checks."""
    try:
        with open(path, "rb") as f:
            z, infos = read_checked_zip(f, path, _outer_cap, {_MANIFEST, _MODEL},
                                        missing=f"{path} is a zip file but not an fxopt model (no {_MANIFEST}/"
                                                f"{_MODEL}); load it with the tool that wrote it")
            with z:
                text = read_member(z, infos[_MANIFEST], path)
                blob = read_member(z, infos[_MODEL], path)
                onnx_blob = read_member(z, infos[_RUNTIME_ONNX], path) if _RUNTIME_ONNX in infos else None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(text), blob, onnx_blob
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{path}: the manifest is not valid JSON (file corrupted?); {DAMAGED}") from e


def _check_manifest(manifest: Any, path: str) -> None:
    """The manifest is a JSON object with the fields fxopt.save writes, of the right types."""
    if not isinstance(manifest, dict):
        raise LoadError(f"{path}: the manifest is a JSON {type(manifest).__name__}, not an object; "
                        "this is not a file written by fxopt.save")
    if manifest.get("format") != FORMAT:
        raise LoadError(f"{path} is not an fxopt model file (format={str(manifest.get('format'))[:40]!r})")
    version = manifest.get("version")
    if type(version) is not int:
        raise LoadError(f"{path}: the manifest's format version is {str(version)[:20]!r}, not a number; "
                        "this is not a file written by fxopt.save")
    if version != VERSION:
        raise LoadError(f"{path} was written by file format version {str(version)[:20]}, this fxopt "
                        f"reads version {VERSION}; upgrade fxopt or re-save the model")
    for key, value in manifest.items():
        if key not in _MANIFEST_TYPES or type(value) not in _MANIFEST_TYPES[key]:
            raise LoadError(f"{path}: manifest field {str(key)[:40]!r} is unknown or has the wrong type "
                            f"({type(value).__name__}); {RESAVE}")
    sums = manifest.get("sha256")
    if not (isinstance(sums, dict) and set(sums) in ({_MODEL}, {_MODEL, _RUNTIME_ONNX})
            and all(isinstance(v, str) and _SHA256.match(v) for v in sums.values())):
        raise LoadError(f"{path}: the manifest has no SHA-256 of {_MODEL}; save the model again with fxopt.save")
    rt = manifest.get("runtime")
    if (rt is not None) != (_RUNTIME_ONNX in sums):
        raise LoadError(f"{path}: the manifest's runtime and its checksums disagree; {RESAVE}")
    if rt is not None and not (set(rt) == {"name", "tolerance", "median_tolerance"}
                               and rt["name"] in ("onnxruntime", "openvino")
                               and all(type(rt[k]) in (float, int, type(None)) for k in ("tolerance", "median_tolerance"))):
        raise LoadError(f"{path}: the manifest's runtime entry is not one fxopt.save writes; {RESAVE}")
    capture = manifest.get("capture") or {}
    for key, value in capture.items():
        if key not in _CAPTURE_TYPES or type(value) not in _CAPTURE_TYPES[key]:
            raise LoadError(f"{path}: manifest capture field {str(key)[:40]!r} is unknown or has the wrong "
                            f"type; {RESAVE}")
    sig = capture.get("signature", [])
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and p[0].isidentifier()
               and isinstance(p[1], bool) for p in sig) or len(sig) > 4096:
        raise LoadError(f"{path}: manifest signature is not a list of [name, optional] pairs; {RESAVE}")
    ranges = capture.get("range_constraints", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in ranges.items()):
        raise LoadError(f"{path}: manifest range constraints are not strings; {RESAVE}")


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a file written by :func:`save`; outputs are bit-identical to the saved module's.

    Nothing in the file is unpickled or evaluated: both zip archives, the
    payload tables, the sample inputs and the graph are checked against
    whitelists first (:mod:`fxopt.archive.archive_check`, :mod:`fxopt.archive.graph_check`).
    Every refusal raises :class:`~fxopt.errors.LoadError`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoadError(f"no such file: {path}")
    # the ops a saved graph may name: defined before the graph check asks for them (the CLI loads files
    # without importing the rest of the library)
    import fxopt.kernels.cpu_quant  # noqa: F401
    import fxopt.kernels.cpu_sparse  # noqa: F401
    import fxopt.quant.qops  # noqa: F401
    manifest, blob, onnx_blob = _read(path)
    _check_manifest(manifest, path)
    if (onnx_blob is None) != (manifest.get("runtime") is None):
        raise LoadError(f"{path}: the runtime's model and the manifest disagree; {RESAVE}")
    if onnx_blob is not None:
        if manifest["sha256"][_RUNTIME_ONNX] != hashlib.sha256(onnx_blob).hexdigest():
            raise LoadError(f"{path} failed its checksum: the runtime's model was modified or damaged after saving; "
                            "save the model again")
        from fxopt.runtime.artifact import check_onnx
        check_onnx(onnx_blob, path)
    # the checksum catches accidents (a cut or damaged file); anyone can recompute it, so
    # what stops a crafted file is the whitelist check below
    if manifest["sha256"][_MODEL] != hashlib.sha256(blob).hexdigest():
        raise LoadError(f"{path} failed its checksum: the model data was modified or damaged after saving; "
                        "save the model again")
    try:
        check_model_archive(blob, path)
    except LoadError:
        raise
    except Exception as e:  # a gap in the checks themselves must still read as a refusal
        raise LoadError(f"{path}: the model archive could not be checked ({type(e).__name__}: "
                        f"{str(e)[:200]}); {RESAVE}") from e
    try:
        with torch_internals():
            ep = torch.export.load(io.BytesIO(blob))
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                ep = ep.run_decompositions({})
            gm = ep.module()
        stride_safe_views(gm)  # the re-export brings back views whose validity depends on sdpa's kernel
        gm.meta[SIGNATURE_KEY] = [(n, d) for n, d in (manifest.get("capture") or {}).get("signature", [])]
        install_input_guard(gm)
    except Exception as e:
        raise LoadError(f"{path}: torch could not rebuild the model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it may need a newer torch "
                        f"(saved with {manifest.get('torch')}, running {torch.__version__}) or "
                        "`import fxopt` kernels it uses") from e
    gm.meta["fxopt_capture"] = {**{k: v for k, v in (manifest.get("capture") or {}).items() if k != "signature"},
                                "front_end": "fxopt.load"}
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        gm.meta["fxopt_example_inputs"] = (tuple(example[0]), dict(example[1]))
    gm.meta["fxopt_manifest"] = manifest
    _warn_slow_int8(gm, path, manifest)
    if onnx_blob is not None:
        from fxopt.runtime.artifact import reattach
        rt = manifest["runtime"]
        return reattach(gm, rt["name"], onnx_blob, path, rt["tolerance"], rt["median_tolerance"])
    return gm


def _warn_slow_int8(gm: fx.GraphModule, path: str, manifest: dict) -> None:
    """A model quantized for another CPU stays exact here, but say which layers run the slower path."""
    from fxopt.kernels.cpu_quant import fallback_layers
    slow = fallback_layers(gm)
    if slow:
        import warnings
        warnings.warn(f"{path}: {len(slow)} int8 layer(s) ({', '.join(slow[:3])}{' ...' if len(slow) > 3 else ''}) "
                      "were quantized with activation codes this CPU's int8 kernels would saturate (a VNNI CPU's "
                      "plan, on a CPU without VNNI); they compute exactly what they did, on a slower exact path. "
                      "Compile the model again on this machine for the fastest kernels", RuntimeWarning,
                      stacklevel=3)

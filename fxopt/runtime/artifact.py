"""A runtime's artifact inside a ``.fxopt`` file: checked before any runtime sees it, re-checked on load.

``fxopt.save`` of a :class:`~fxopt.runtime.engines.RuntimeModule` writes the fxopt graph as always and
the ONNX model it runs beside it (``runtime.onnx``, with its SHA-256 and the runtime's name in the
manifest). ``fxopt.load`` then parses the ONNX bytes as data (protobuf; nothing is executed) and refuses
a file whose graph names weights outside itself (external data: a path on the loading machine) or ops
outside the standard ONNX domain (a custom op library is native code); only then is the runtime built,
and its outputs are compared with the fxopt graph's on the saved example inputs, with the bounds of
:mod:`fxopt.runtime.select`. A runtime that is not installed here, or that no longer agrees, leaves the
loaded model on fxopt's own graph, with a warning that says why.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch.fx as fx

from fxopt.errors import LoadError, RuntimeUnavailable

__all__ = ["check_onnx", "reattach", "STANDARD_DOMAINS"]

STANDARD_DOMAINS = ("", "ai.onnx")


def check_onnx(data: bytes, where: str) -> None:
    """Refuse ONNX bytes that are not a self-contained model of standard ops (raises LoadError)."""
    try:
        import onnx
    except ImportError:
        return  # nothing can run it here either; reattach says so
    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise LoadError(f"{where}: the runtime's ONNX model does not parse ({type(e).__name__}); save the model "
                        "again with fxopt.save") from e
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for t in list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]:
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
                raise LoadError(f"{where}: the runtime's ONNX model reads weights from outside the file "
                                f"({t.name[:80]!r}); fxopt.save never writes that: refusing it")
        for n in g.node:
            if n.domain not in STANDARD_DOMAINS:
                raise LoadError(f"{where}: the runtime's ONNX model uses an op of domain {n.domain[:60]!r} "
                                f"({n.op_type[:60]}); fxopt.save writes standard ONNX ops only: refusing it")
            graphs += [a.g for a in n.attribute if a.HasField("g")] + list(a for at in n.attribute for a in at.graphs)
    if len(model.functions):
        raise LoadError(f"{where}: the runtime's ONNX model defines functions, which fxopt.save never writes")


def reattach(gm: fx.GraphModule, name: str, data: bytes, where: str, tolerance: float | None = None,
             median_tolerance: float | None = None) -> Any:
    """The RuntimeModule for ``gm`` on runtime ``name`` with the saved ONNX ``data``, or ``gm`` with a warning."""
    from fxopt.runtime.select import choose_runtime
    from fxopt.ir.capture import example_call
    if gm.meta.get("fxopt_example_inputs") is None:
        warnings.warn(f"{where}: saved for runtime '{name}' but without example inputs to check it; running "
                      "fxopt's graph", RuntimeWarning, stacklevel=3)
        return gm
    args, kwargs = example_call(gm)
    try:
        handed, record = choose_runtime(gm, args, kwargs, name, repeats=0, onnx=data,
                                         tolerance=tolerance, median_tolerance=median_tolerance)
    except RuntimeUnavailable as e:
        warnings.warn(f"{where}: saved to run on {name}, which cannot run here ({str(e).splitlines()[0]}); the "
                      "loaded model runs fxopt's own graph on PyTorch instead", RuntimeWarning, stacklevel=3)
        return gm
    history = getattr(gm, "fxopt_history", None)
    if history is not None:
        history.runtime = record
    return handed

"""Typed errors. Every message names what failed, what was expected and what to do."""
from __future__ import annotations

__all__ = [
    "FxoptError",
    "TraceError",
    "PassError",
    "PipelineError",
    "RecipeError",
    "InputError",
    "LoadError",
    "CalibrationError",
    "ExportError",
    "RuntimeUnavailable",
    "mark_user_error",
    "is_user_error",
]


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class TraceError(FxoptError):
    """The model could not be captured into a graph.

    Attributes: ``module`` (dotted path of the module whose code failed, ``""`` for
    the root), ``location`` (``file:line``), ``source`` (the offending line),
    ``reason`` and ``remedy``.
    """

    def __init__(self, reason: str, *, module: str | None = None, location: str | None = None,
                 source: str | None = None, remedy: str = ""):
        self.reason, self.module, self.location = reason, module, location
        self.source, self.remedy = source, remedy
        self.details = ""  # what torch printed while failing, for bug reports
        where = ""
        if module is not None:
            where += f" in module '{module or '<root>'}'"
        if location:
            where += f" at {location}"
        msg = f"cannot capture the model{where}: {reason}"
        if source:
            msg += f"\n    {source.strip()}"
        if remedy:
            msg += f"\nWhat to do: {remedy}"
        super().__init__(msg)


class PassError(FxoptError):
    """A pass raised, broke the graph, or changed the numerics beyond its tolerance."""

    def __init__(self, pass_name: str, reason: str, *, remedy: str = ""):
        self.pass_name, self.reason, self.remedy = pass_name, reason, remedy
        msg = f"pass '{pass_name}' failed: {reason}"
        if remedy:
            msg += f"\nWhat to do: {remedy}"
        super().__init__(msg)


class PipelineError(FxoptError, ValueError):
    """A pipeline string or pass name could not be understood."""


class RecipeError(FxoptError, ValueError):
    """An unknown recipe or a recipe given bad options."""


class InputError(FxoptError, ValueError):
    """Example inputs that cannot be used (wrong type, NaN/Inf, wrong shape)."""


class LoadError(FxoptError):
    """A saved fxopt file that is missing, truncated, tampered with or of another version."""


class CalibrationError(FxoptError):
    """Calibration data that cannot be used (empty, NaN/Inf, wrong shapes)."""


class ExportError(FxoptError):
    """A graph that cannot be written in an exchange format (ONNX): names the op and what to do."""


class RuntimeUnavailable(FxoptError, ValueError):
    """A runtime (``runtime="onnxruntime"`` ...) that is not installed, unknown, or cannot run the model."""


def mark_user_error(e: BaseException) -> BaseException:
    """Tag an exception raised by the user's own code (their data loader, metric, callback).

    The pass manager re-raises tagged exceptions as they are instead of rolling the pass
    back: a failure in the user's code must not be hidden behind a rolled-back pass.
    """
    try:
        e.__fxopt_user_error__ = True  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__: nothing to tag, the manager treats it as a pass bug
        pass
    return e


def is_user_error(e: BaseException) -> bool:
    return bool(getattr(e, "__fxopt_user_error__", False))

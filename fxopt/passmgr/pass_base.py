"""The pass protocol: ``Pass``, ``PassResult``, ``PassContext``, the pass registry.

A pass is a small class with a kebab-case ``name``, a frozen dataclass
``Config`` and one ``run`` method::

    @fxopt.register_pass
    class DropReluPass(fxopt.Pass):
        name = "drop-relu"
        preserves_semantics = False          # the manager will not compare outputs

        def run(self, gm, ctx):
            changed = False
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    changed = True
            return fxopt.PassResult(changed)

or a decorated function whose keyword parameters become its options::

    @fxopt.graph_pass("scale-outputs", preserves_semantics=False)
    def scale_outputs(gm, ctx, factor: float = 2.0):
        ...
        return True   # changed

A ``run`` may mutate the GraphModule it is given; the manager snapshots it
first and rolls back a pass that fails. A pass that rewrites tensor data in
place (``weight.data.mul_(...)``) must set ``inplace_weights = True`` so the
snapshot copies the tensors.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx as fx

from fxopt.errors import PipelineError

__all__ = [
    "ALL",
    "Tolerance",
    "PassResult",
    "PassContext",
    "Pass",
    "EmptyConfig",
    "register_pass",
    "graph_pass",
    "get_pass",
    "list_passes",
    "PASS_REGISTRY",
]

#: ``PassResult(preserved=ALL)``: every analysis is still valid.
ALL = frozenset({"*"})

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9:]+)*$")


@dataclass(frozen=True)
class Tolerance:
    """How far outputs may move after a semantics-preserving pass: ``|a-b| <= atol + rtol*|b|``."""

    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"tolerances must be >= 0, got atol={self.atol}, rtol={self.rtol}")


EXACT = Tolerance(0.0, 0.0)


@dataclass(frozen=True)
class PassResult:
    """What a pass did: ``changed`` and which analyses (by name) are still valid.

    ``preserved`` defaults to nothing; it does not matter when ``changed`` is
    False (an unchanged graph keeps every analysis). ``info`` carries counts
    and notes for the record (``{"removed": 12}``).
    """

    changed: bool
    preserved: frozenset = frozenset()
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "preserved", frozenset(self.preserved))

    def preserves(self, analysis: str) -> bool:
        return not self.changed or "*" in self.preserved or analysis in self.preserved


@dataclass(frozen=True)
class EmptyConfig:
    """A pass without options."""


class PassContext:
    """What a pass may look at besides the graph.

    * ``args`` / ``kwargs``: the example inputs;
    * ``analyses``: the :class:`~fxopt.passmgr.analysis.AnalysisManager`; ``ctx.analysis("shapes")``
      returns a cached analysis result for the current graph;
    * ``calibration``: calibration data when the user gave some;
    * ``verify_inputs``: more ``(args, kwargs)`` the manager verifies every pass on
      (checks inside a pass, such as ``lower-quant``'s, use them too);
    * ``options``: free-form options from ``fxopt.compile(..., **options)``.
    """

    def __init__(self, args: tuple = (), kwargs: dict | None = None, *, analyses: Any = None,
                 calibration: Any = None, options: dict | None = None, verify_inputs: Any = ()):
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.analyses = analyses
        self.calibration = calibration
        self.options = dict(options or {})
        self.verify_inputs = list(verify_inputs or ())

    def analysis(self, name: str, gm: fx.GraphModule) -> Any:
        if self.analyses is None:
            from fxopt.passmgr.analysis import AnalysisManager
            self.analyses = AnalysisManager()
        return self.analyses.get(name, gm, self)

    def run(self, gm: fx.GraphModule, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        """Run ``gm`` on the example inputs (or on ``args``/``kwargs``): no grad, and the model's own
        state (buffers its forward writes) put back afterwards."""
        from fxopt.ir.graph_utils import preserved_state
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        with torch.no_grad(), preserved_state(gm):
            return gm(*args, **kwargs)


_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _wrong_kind(fields: dict, key: str, value: Any) -> str | None:
    """The kind an option declared as bool/int/float/str needs, when ``value`` is not of it."""
    f = fields[key]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    want = _SCALARS.get(kind)
    if want is None or value is None:
        return None
    if want is bool:
        ok = isinstance(value, bool)
    elif want in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or
                                                                                  float(value).is_integer())
    else:
        ok = isinstance(value, str)
    return None if ok else kind


def _bad_value(name: str, fields: dict, options: dict, error: Exception | None) -> str:
    """The message for an option of the right name and the wrong kind of value."""
    for key, value in options.items():
        kind = _wrong_kind(fields, key, value)
        if kind:
            default = fields[key].default
            article = "an" if kind[0] in "aeiou" else "a"
            return f"pass '{name}': option {key}={value!r} must be {article} {kind} (default {default!r})"
    return f"pass '{name}': bad option value ({error})"


class Pass:
    """Base class of transformation passes. See the module docstring for an example."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    #: the manager compares outputs before/after within ``tolerance`` when True
    preserves_semantics: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance] = Tolerance()
    #: set when ``run`` writes into existing tensors in place (forces a deep snapshot)
    inplace_weights: ClassVar[bool] = False
    #: names of ``compile(..., **options)`` this pass reads from ``ctx.options`` (checked for typos)
    reads_options: ClassVar[tuple] = ()
    #: the pass exists to compress the model: ``compile`` warns when it changes nothing (say why in
    #: ``PassResult.info["why"]``)
    compresses: ClassVar[bool] = False

    def __init__(self, config: Any = None, **options: Any):
        if config is not None and options:
            raise TypeError(f"{type(self).__name__}: give a config or keyword options, not both")
        if config is None:
            fields = {f.name: f for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(options) - set(fields))
            if unknown:
                raise PipelineError(f"pass '{self.name}' got unknown option{'s' if len(unknown) > 1 else ''} "
                                    f"{', '.join(unknown)}; its options are {', '.join(fields) or 'none'}")
            if any(_wrong_kind(fields, k, v) for k, v in options.items()):
                raise PipelineError(_bad_value(self.name, fields, options, None))
            try:
                config = self.Config(**options)
            except PipelineError:
                raise
            except (TypeError, ValueError) as e:
                raise PipelineError(_bad_value(self.name, fields, options, e)) from e
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def check_options(self, options: dict) -> None:
        """Validate the ``compile`` options this pass reads, before any heavy work (raise a typed error)."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        """Run the pass alone, without the manager's checks (used by tests and other passes)."""
        result = self.run(gm, ctx or PassContext())
        if isinstance(result, bool):
            result = PassResult(result)
        if result.changed:
            gm.graph.lint()
            gm.recompile()
        return result

    def with_options(self, options: dict) -> "Pass":
        """This pass with the ``compile(**options)`` it reads folded into its config.

        A pass whose behaviour a compile option changes returns a copy whose config says so,
        so the printed pipeline reproduces the run without the options
        (``compile(model, args, recipe=history.pipeline)``). The default: the pass itself.
        """
        return self

    # -- pipeline text -------------------------------------------------
    def options(self) -> dict:
        """Options that differ from the defaults, in declaration order."""
        out = {}
        default = self.Config()
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value != getattr(default, f.name):
                out[f.name] = value
        return out

    def __str__(self) -> str:
        from fxopt.passmgr.syntax import format_options
        opts = self.options()
        return f"{self.name}({format_options(opts)})" if opts else self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    @classmethod
    def doc(cls) -> str:
        """The first paragraph of the docstring."""
        text = inspect.getdoc(cls) or ""
        return text.split("\n\n")[0].replace("\n", " ")


#: name -> Pass subclass (or pipeline alias factory); extend with :func:`register_pass`
PASS_REGISTRY: dict[str, type] = {}


#: pipeline aliases by name (fxopt.passmgr.pipeline.PipelineAlias: data, expanded by the manager)
ALIAS_REGISTRY: dict[str, Any] = {}


def register_pass(cls: type, *, replace: bool = False) -> type:
    """Class decorator: make a pass available by name in pipeline strings."""
    name = getattr(cls, "name", "")
    if not name or not _KEBAB.match(name):
        raise PipelineError(f"{cls.__name__}.name must be a kebab-case name like 'fold-bn', got {name!r}")
    alias = ALIAS_REGISTRY.get(name)
    if alias is not None:
        if not (alias.from_recipe or replace):
            raise PipelineError(f"'{name}' is a pipeline alias ({alias.pipeline}); pick another name for the "
                                f"pass {cls.__name__} or pass replace=True")
        del ALIAS_REGISTRY[name]   # a pass owns its name over a recipe's alias
    if name in PASS_REGISTRY and PASS_REGISTRY[name] is not cls and not replace:
        raise PipelineError(f"a pass named '{name}' is already registered ({PASS_REGISTRY[name].__name__}); "
                            "pick another name or pass replace=True")
    if not (dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen):
        raise PipelineError(f"{cls.__name__}.Config must be a frozen dataclass")
    PASS_REGISTRY[name] = cls
    return cls


def graph_pass(name: str, *, preserves_semantics: bool = True, tolerance: Tolerance = Tolerance(),
               preserves: Iterable[str] = (), register: bool = True,
               inplace_weights: bool = False) -> Callable[[Callable], type]:
    """Decorator: turn ``fn(gm, ctx, **options) -> bool | PassResult`` into a registered pass class.

    Keyword parameters with defaults become the pass's options (its ``Config``);
    a bare bool return means ``changed`` with the analyses in ``preserves`` kept.
    """
    def wrap(fn: Callable) -> type:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[2:]
        fields = []
        for p in params:
            if p.default is inspect.Parameter.empty:
                raise PipelineError(f"option '{p.name}' of pass '{name}' needs a default value")
            ann = p.annotation if p.annotation is not inspect.Parameter.empty else Any
            fields.append((p.name, ann, dataclasses.field(default=p.default)))
        config = dataclasses.make_dataclass(f"{fn.__name__}_Config", fields, frozen=True)
        kept = frozenset(preserves)

        def run(self: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            out = fn(gm, ctx, **dataclasses.asdict(self.config))
            if isinstance(out, PassResult):
                return out
            return PassResult(bool(out), kept)

        cls = type(f"{fn.__name__}_Pass", (Pass,), {
            "name": name, "Config": config, "preserves_semantics": preserves_semantics,
            "tolerance": tolerance, "inplace_weights": inplace_weights, "run": run,
            "__doc__": fn.__doc__, "__module__": fn.__module__, "fn": staticmethod(fn),
        })
        return register_pass(cls, replace=True) if register else cls
    return wrap


def _builtins() -> None:
    """Make sure the built-in passes are registered (``import fxopt`` alone loads nothing)."""
    import fxopt
    fxopt._load()


def get_pass(name: str) -> type:
    if name not in PASS_REGISTRY:
        _builtins()
    if name not in PASS_REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, PASS_REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        if name in ALIAS_REGISTRY:
            raise PipelineError(f"'{name}' is a pipeline alias ({ALIAS_REGISTRY[name].pipeline}), not a pass; "
                                "use it in a pipeline string, or fxopt.passmgr.pipeline.get_pipeline")
        raise PipelineError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(sorted(PASS_REGISTRY))} "
                            "(`fxopt passes` lists them with their options)")
    return PASS_REGISTRY[name]


def list_passes() -> dict[str, type]:
    _builtins()
    return dict(sorted(PASS_REGISTRY.items()))

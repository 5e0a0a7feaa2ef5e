"""Pipelines: sequences of passes that print as one line and parse back.

Grammar (whitespace is ignored)::

    pipeline := step ("," step)*
    step     := NAME | NAME "(" option ("," option)* ")" | "repeat(" pipeline ["," "max=" INT] ")"
    option   := NAME "=" value
    value    := INT | FLOAT | true | false | none | 'quoted' | bare-word | "[" value ("," value)* "]"

``str(parse_pipeline(s)) == s`` for every canonical string (options in
declaration order, defaults omitted), so any run is reproducible from the
one line its history prints::

    >>> from fxopt.passmgr.pipeline import parse_pipeline
    >>> str(parse_pipeline("repeat(cse,dce),remove-noops"))
    'repeat(cse,dce),remove-noops'
"""
from __future__ import annotations

from dataclasses import dataclass

import re
from typing import Any, Iterator, Sequence, Union

from fxopt.errors import PipelineError
from fxopt.passmgr.pass_base import (_KEBAB, ALIAS_REGISTRY, PASS_REGISTRY, Pass, _builtins, get_pass)
from fxopt.passmgr.syntax import _KEYWORDS, format_options, format_value  # noqa: F401  (re-exported)

__all__ = ["Pipeline", "Repeat", "PipelineAlias", "parse_pipeline", "format_options", "register_pipeline",
           "get_pipeline", "list_pipelines",
           "as_pipeline", "fold_options", "passes_of"]

Step = Union[Pass, "Repeat", "Pipeline"]


class Pipeline:
    """An ordered list of steps (passes, ``Repeat`` blocks, aliases)."""

    def __init__(self, steps: Sequence[Any] = ()):
        self.steps = [as_step(s) for s in steps]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.steps == other.steps

    def __add__(self, other: Any) -> "Pipeline":
        return Pipeline(self.steps + list(as_pipeline(other).steps))


class Repeat:
    """Run the inner pipeline until no pass in it changes the graph (at most ``max`` rounds)."""

    DEFAULT_MAX = 10

    def __init__(self, *steps: Any, max: int = DEFAULT_MAX):
        if len(steps) == 1 and isinstance(steps[0], (Pipeline, list, tuple, str)):
            inner = as_pipeline(steps[0])
        else:
            inner = Pipeline(steps)
        if not isinstance(max, int) or max < 1:
            raise PipelineError(f"repeat(..., max=N) needs a positive integer, got {max!r}")
        self.inner, self.max = inner, max

    def __str__(self) -> str:
        extra = f",max={self.max}" if self.max != self.DEFAULT_MAX else ""
        return f"repeat({self.inner}{extra})"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Repeat) and self.inner == other.inner and self.max == other.max


@dataclass(frozen=True)
class PipelineAlias:
    """A named pipeline, usable as one step (``cleanup``, every recipe): data, not a pass. The
    manager expands it in place; it has no semantics flag or tolerance of its own (its passes do)."""

    name: str
    pipeline: str
    doc: str = ""
    from_recipe: bool = False   # registered by register_recipe (a pass may take the name later)

    def expand(self) -> Pipeline:
        return parse_pipeline(self.pipeline)

    def __str__(self) -> str:
        return self.name


def register_pipeline(name: str, pipeline: str, doc: str, *, from_recipe: bool = False) -> PipelineAlias:
    """Register ``name`` as a step that expands to ``pipeline``."""
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise PipelineError(f"a pipeline alias needs a kebab-case name like 'my-cleanup', got {name!r}")
    if name in PASS_REGISTRY:
        raise PipelineError(f"'{name}' is a pass ({PASS_REGISTRY[name].__name__}); an alias cannot take its name")
    parse_pipeline(pipeline)  # fail early on typos
    alias = PipelineAlias(name, pipeline, f"{doc}\n\nExpands to ``{pipeline}``.", from_recipe)
    ALIAS_REGISTRY[name] = alias
    return alias


def get_pipeline(name: str) -> PipelineAlias | None:
    """The alias registered as ``name``, or None."""
    if name not in ALIAS_REGISTRY and name not in PASS_REGISTRY:
        _builtins()
    return ALIAS_REGISTRY.get(name)


def list_pipelines() -> dict[str, PipelineAlias]:
    _builtins()
    return dict(sorted(ALIAS_REGISTRY.items()))


def as_step(step: Any) -> Any:
    if isinstance(step, (Pass, Repeat, Pipeline, PipelineAlias)):
        return step
    if isinstance(step, type) and issubclass(step, Pass):
        return step()
    if isinstance(step, str):
        p = parse_pipeline(step)
        return p.steps[0] if len(p) == 1 else p
    raise PipelineError(f"cannot use {step!r} as a pipeline step; give a Pass, a pass name or a Repeat")


def as_pipeline(obj: Any) -> Pipeline:
    """A pipeline from a string, a list of steps, a single pass, or a Pipeline."""
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, str):
        return parse_pipeline(obj)
    if obj is None:
        return Pipeline([])
    if isinstance(obj, (list, tuple)):
        return Pipeline(obj)
    return Pipeline([obj])


# ---------------------------------------------------------------- parser
_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![A-Za-z_])"
                    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.:/\-]*)|(?P<punct>[(),=\[\]]))")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                self.fail(pos, "unexpected character")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, pos: int, msg: str) -> None:
        raise PipelineError(f"bad pipeline string at column {pos + 1}: {msg}\n  {self.text}\n  {' ' * pos}^\n"
                            "Pipelines look like 'cleanup,fold-bn,cast(dtype=bf16),repeat(cse,dce)'")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            self.fail(len(self.text), f"expected {value or kind}, got the end")
        assert tok is not None
        if (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            self.fail(tok[2], f"expected {value or kind}, got '{tok[1]}'")
        self.i += 1
        return tok

    def pipeline(self, inside_repeat: bool = False) -> tuple[list, dict]:
        steps: list = []
        opts: dict = {}
        while True:
            tok = self.peek()
            if tok is None or tok[1] == ")":
                self.fail(tok[2] if tok else len(self.text), "expected a pass name")
            assert tok is not None
            nxt = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
            if inside_repeat and nxt is not None and nxt[1] == "=":
                key = self.take(kind="word")[1]
                self.take("=")
                opts[key] = self.value()
            else:
                steps.append(self.step())
            tok = self.peek()
            if tok is None or tok[1] != ",":
                return steps, opts
            self.take(",")

    def step(self) -> Any:
        name_tok = self.take(kind="word")
        name = name_tok[1]
        if name == "repeat":
            self.take("(")
            steps, opts = self.pipeline(inside_repeat=True)
            self.take(")")
            unknown = set(opts) - {"max"}
            if unknown:
                self.fail(name_tok[2], f"repeat takes only max=N, got {sorted(unknown)}")
            return Repeat(Pipeline(steps), **opts)
        opts = {}
        tok = self.peek()
        if tok is not None and tok[1] == "(":
            self.take("(")
            while True:
                key = self.take(kind="word")[1]
                self.take("=")
                opts[key] = self.value()
                if self.peek() is not None and self.peek()[1] == ",":  # type: ignore[index]
                    self.take(",")
                    continue
                break
            self.take(")")
        alias = get_pipeline(name) if name not in PASS_REGISTRY else None
        if alias is not None:
            if opts:
                self.fail(name_tok[2], f"'{name}' is a pipeline alias ({alias.pipeline}); it takes no options")
            return alias
        try:
            cls = get_pass(name)
        except PipelineError as e:
            raise PipelineError(f"{e}\n  in pipeline: {self.text}") from None
        return cls(**opts)

    def value(self) -> Any:
        tok = self.take()
        kind, text = tok[0], tok[1]
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "str":
            return re.sub(r"\\(.)", r"\1", text[1:-1])
        if kind == "word":
            return _KEYWORDS.get(text, text) if text in _KEYWORDS else text
        if text == "[":
            items = []
            if self.peek() is not None and self.peek()[1] == "]":  # type: ignore[index]
                self.take("]")
                return tuple(items)
            while True:
                items.append(self.value())
                if self.take()[1] == "]":
                    return tuple(items)
        self.fail(tok[2], f"expected a value, got '{text}'")


def parse_pipeline(text: str) -> Pipeline:
    """Parse a pipeline string; raises :class:`PipelineError` pointing at the bad column."""
    if not isinstance(text, str) or not text.strip():
        raise PipelineError("empty pipeline string; give pass names separated by commas, e.g. 'cleanup'")
    p = _Parser(text)
    steps, _ = p.pipeline()
    if p.peek() is not None:
        p.fail(p.peek()[2], f"unexpected '{p.peek()[1]}'")  # type: ignore[index]
    return Pipeline(steps)


def fold_options(pipeline: Any, options: dict) -> Pipeline:
    """``pipeline`` with every pass's :meth:`~fxopt.Pass.with_options` applied: the compile options that
    change what a pass does become part of its printed config. An alias stays an alias unless a step
    inside it changes (then it is replaced by its folded expansion)."""
    def fold(step: Any) -> Any:
        if isinstance(step, Repeat):
            return Repeat(fold_options(step.inner, options), max=step.max)
        if isinstance(step, Pipeline):
            return fold_options(step, options)
        if isinstance(step, PipelineAlias):
            inner = step.expand()
            folded = fold_options(inner, options)
            return step if folded == inner else folded
        return step.with_options(options)
    if not options:
        return as_pipeline(pipeline)
    return Pipeline([fold(s) for s in as_pipeline(pipeline).steps])


def passes_of(pipeline: Any) -> list:
    """Every pass in a pipeline, with repeats and aliases expanded."""
    out: list = []
    for step in as_pipeline(pipeline).steps:
        if isinstance(step, Repeat):
            out += passes_of(step.inner)
        elif isinstance(step, Pipeline):
            out += passes_of(step)
        elif isinstance(step, PipelineAlias):
            out += passes_of(step.expand())
        else:
            out.append(step)
    return out

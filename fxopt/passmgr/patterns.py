"""Pattern rewrites declared by example.

A pattern and its replacement are plain Python functions over torch ops. fxopt
captures both into the canonical dialect (the same ATen graph passes see), so
nobody matches ATen nodes by hand::

    import torch, fxopt

    def pattern(x):
        return x * torch.sigmoid(x)

    def replacement(x):
        return torch.nn.functional.silu(x)

    swish = fxopt.Rewrite(pattern, replacement)                  # one rule
    fxopt.register_rewrites("my-swish", [swish])                 # a named pass: "cleanup,my-swish"

``where=`` filters matches: it gets a :class:`Match` and returns a bool
(``lambda m: m.shape("x")[-1] % 8 == 0``). Rules compose with ``+``; a
:class:`RewritePass` indexes its rules by anchor op (the op that produces the
pattern's output), skips rules whose anchor is absent, counts rewrites per
rule and remembers where each rule was defined, so its record reads
``{"rewrites": {"pattern@my_rules.py:12": 3}}``. A rule that never matches
counts zero; it is not an error.

Patterns are traced with ``example_inputs`` (default: one ``8x8`` float
tensor per parameter); give shapes that make the ops valid (a conv weight
needs 4 dimensions).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx import subgraph_rewriter

from fxopt.ir.torch_compat import torch_internals
from fxopt.errors import PipelineError, TraceError
from fxopt.ir.meta import propagate_meta
from fxopt.passmgr.pass_base import Pass, PassContext, PassResult, Tolerance, register_pass

__all__ = ["Rewrite", "RewriteSet", "Match", "RewritePass", "register_rewrites", "capture_pattern"]


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _params(fn: Callable) -> list:
    return [p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def capture_pattern(fn: Callable, example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """Trace ``fn`` into the canonical dialect (no shape guards, inputs as placeholders)."""
    params = _params(fn)
    if example_inputs is None:
        example_inputs = tuple(torch.randn(8, 8) for _ in params)
    try:
        with torch_internals():
            ep = torch.export.export(_Fn(fn), tuple(example_inputs), strict=False).run_decompositions({})
    except Exception as e:
        raise TraceError(f"cannot capture the pattern function {fn.__qualname__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}",
                         remedy="pass example_inputs= with shapes the ops accept") from e
    gm = ep.graph_module
    # name placeholders after the function's parameters so where= can refer to them
    for node, p in zip([n for n in gm.graph.nodes if n.op == "placeholder"], params):
        node._rename(p.name)
        node.target = p.name
    for node in list(gm.graph.nodes):  # export's metadata asserts are not part of the pattern
        if node.op == "call_function" and "assert" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


class Match:
    """A match handed to ``where=``: look up graph nodes by the pattern's parameter names."""

    def __init__(self, internal: Any, pattern: fx.Graph):
        self.internal = internal
        self._by_name = {pn.name: gn for pn, gn in internal.nodes_map.items() if pn.op == "placeholder"}

    def __getitem__(self, name: str) -> Any:
        if name not in self._by_name:  # a typo in where= must not silently disable the rule
            raise PipelineError(f"where=: the pattern has no input named {name!r}; its inputs are "
                                f"{', '.join(sorted(self._by_name)) or 'none'}")
        return self._by_name[name]

    def val(self, name: str) -> Any:
        """The FakeTensor (or value) bound to pattern input ``name``."""
        node = self[name]
        return node.meta.get("val") if isinstance(node, fx.Node) else node

    def shape(self, name: str) -> tuple:
        v = self.val(name)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else ()

    def dtype(self, name: str) -> Any:
        v = self.val(name)
        return v.dtype if isinstance(v, torch.Tensor) else None

    @property
    def nodes(self) -> list[fx.Node]:
        return [gn for pn, gn in self.internal.nodes_map.items() if pn.op == "call_function"]


@dataclasses.dataclass
class Rewrite:
    """One rule: ``pattern`` -> ``replacement`` where ``where(match)`` holds."""

    pattern: Callable
    replacement: Callable
    where: Callable[[Match], bool] | None = None
    example_inputs: Sequence[Any] | None = None
    name: str = ""
    ignore_literals: bool = False

    def __post_init__(self) -> None:
        fn = self.pattern
        if not self.name:
            self.name = getattr(fn, "__name__", "pattern")
        try:
            src = inspect.getsourcefile(fn) or "?"
            line = inspect.getsourcelines(fn)[1]
            self.defined_at = f"{os.path.basename(src)}:{line}"
        except (OSError, TypeError):
            self.defined_at = "?"
        self._pattern_gm: fx.GraphModule | None = None
        self._replacement_gm: fx.GraphModule | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.defined_at}"

    def graphs(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        if self._pattern_gm is None:
            self._pattern_gm = capture_pattern(self.pattern, self.example_inputs)
            self._replacement_gm = capture_pattern(self.replacement, self.example_inputs)
        return self._pattern_gm, self._replacement_gm  # type: ignore[return-value]

    def anchor(self) -> Any:
        """The op producing the pattern's output: rules are only tried where it occurs.

        Found with a quick pre-dispatch trace, so that rules whose anchor is absent from a
        graph never pay for the full capture (about 0.15 s per function with torch.export).
        """
        if not hasattr(self, "_anchor"):
            try:
                from torch.fx.experimental.proxy_tensor import make_fx
                inputs = self.example_inputs or tuple(torch.randn(8, 8) for _ in _params(self.pattern))
                graph = make_fx(self.pattern, pre_dispatch=True)(*inputs).graph
            except Exception:  # fall back to the full capture
                graph = self.graphs()[0].graph
            out = next(n for n in graph.nodes if n.op == "output")
            first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
            self._anchor = first.target if isinstance(first, fx.Node) and first.op == "call_function" else None
            self._ops = frozenset(n.target for n in graph.nodes if n.op == "call_function"
                                  and isinstance(n.target, torch._ops.OpOverload) and "sym_" not in str(n.target))
        return self._anchor

    def required_ops(self) -> frozenset:
        """Every op of the pattern (from the same quick trace): a graph lacking one cannot match, so
        the rule is skipped without capturing it (cold, each capture costs a few hundred ms)."""
        self.anchor()
        return self._ops

    def __add__(self, other: Any) -> "RewriteSet":
        return RewriteSet([self]) + other

    def apply(self, gm: fx.GraphModule) -> int:
        pattern, replacement = self.graphs()
        filters = []
        if self.where is not None:
            where = self.where

            def keep(internal: Any, graph: fx.Graph, pattern_graph: fx.Graph) -> bool:
                try:
                    return bool(where(Match(internal, pattern_graph)))
                except PipelineError:
                    raise
                except Exception as e:  # a broken check is the rule author's bug: say which rule, not skip it
                    raise PipelineError(f"rewrite rule {self.label}: its where= raised {type(e).__name__}: {e}"
                                        ) from e
            filters.append(keep)
        replaced = subgraph_rewriter.replace_pattern_with_filters(
            gm, pattern, replacement, match_filters=filters, ignore_literals=self.ignore_literals)
        for r in replaced:  # metadata copied from the replacement's own trace belongs to another fake mode
            for node in r.replacements:
                node.meta.pop("val", None)
                anchor = r.anchor
                if "nn_module_stack" in anchor.meta:
                    node.meta["nn_module_stack"] = anchor.meta["nn_module_stack"]
        return len(replaced)


class RewriteSet:
    """An ordered set of rules; ``a + b`` concatenates."""

    def __init__(self, rules: Iterable[Rewrite] = ()):
        self.rules = list(rules)

    def __add__(self, other: Any) -> "RewriteSet":
        extra = other.rules if isinstance(other, RewriteSet) else [other]
        return RewriteSet(self.rules + list(extra))

    def __iter__(self) -> Any:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


class RewritePass(Pass):
    """Apply each rule of a set over the graph once (subclasses set ``name`` and ``rules``).

    One sweep per run keeps a rule and its inverse from ping-ponging forever; put the
    pass in ``repeat(...)`` to run it to a fixed point."""

    rules: RewriteSet = RewriteSet()
    tolerance = Tolerance(1e-5, 1e-5)
    max_rounds = 1

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = {r.label: 0 for r in self.rules}
        for _ in range(self.max_rounds):
            present = {n.target for n in gm.graph.nodes if n.op == "call_function"}
            round_total = 0
            for rule in self.rules:
                anchor = rule.anchor()
                if anchor is not None and anchor not in present or not rule.required_ops() <= present:
                    continue
                n = rule.apply(gm)
                counts[rule.label] += n
                round_total += n
            if not round_total:
                break
        total = sum(counts.values())
        if total:
            propagate_meta(gm)
        return PassResult(bool(total), frozenset(), {"rewrites": counts})


def register_rewrites(name: str, rules: Iterable[Rewrite] | RewriteSet, *, doc: str = "",
                      preserves_semantics: bool = True, tolerance: Tolerance = Tolerance(1e-5, 1e-5)) -> type:
    """Register ``rules`` as a pass called ``name`` (usable in pipelines) and return its class."""
    rule_set = rules if isinstance(rules, RewriteSet) else RewriteSet(rules)
    if not len(rule_set):
        raise PipelineError(f"rewrite pass '{name}' has no rules")
    cls = type(f"{name.replace('-', '_').title().replace('_', '')}Pass", (RewritePass,), {
        "name": name, "rules": rule_set, "preserves_semantics": preserves_semantics, "tolerance": tolerance,
        "__doc__": doc or f"User rewrites: {', '.join(r.label for r in rule_set)}.",
    })
    return register_pass(cls, replace=True)

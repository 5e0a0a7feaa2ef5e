"""Analyses: computed lazily, cached, invalidated by what passes report.

An analysis is a class with a ``name`` and ``run(gm, ctx) -> result``. The
:class:`AnalysisManager` caches one result per analysis for the current graph;
after a pass it drops every result the pass did not declare preserved.

``check(gm, ctx)`` recomputes every cached analysis and compares it with the
cache; the manager calls it after each pass when ``check_preserved=True`` (the
contract test does), so a pass that claims to preserve an analysis it breaks is
caught.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.errors import PipelineError

__all__ = ["Analysis", "AnalysisManager", "register_analysis", "get_analysis", "list_analyses",
           "ANALYSIS_REGISTRY"]


class Analysis:
    """Base class: ``name`` plus ``run(gm, ctx)``; ``same(a, b, gm)`` compares two results."""

    name: ClassVar[str] = ""

    def run(self, gm: fx.GraphModule, ctx: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def same(self, cached: Any, fresh: Any, gm: fx.GraphModule) -> bool:
        """Whether a cached result is still right for ``gm`` (default: equality)."""
        return cached == fresh


ANALYSIS_REGISTRY: dict[str, type] = {}


def register_analysis(cls: type) -> type:
    if not cls.name:
        raise PipelineError(f"{cls.__name__} needs a name")
    ANALYSIS_REGISTRY[cls.name] = cls
    return cls


def get_analysis(name: str) -> type:
    if name not in ANALYSIS_REGISTRY:
        raise PipelineError(f"unknown analysis '{name}'; known: {', '.join(sorted(ANALYSIS_REGISTRY))}")
    return ANALYSIS_REGISTRY[name]


def list_analyses() -> dict[str, type]:
    return dict(sorted(ANALYSIS_REGISTRY.items()))


def _ignore(*args: Any) -> None:
    pass


class AnalysisManager:
    """Caches analysis results for one graph module."""

    def __init__(self, instruments: Any = ()) -> None:
        self._cache: dict[str, Any] = {}
        self.computed: dict[str, int] = {}  # how often each analysis ran (for tests and timing)
        #: objects with before_analysis/after_analysis hooks (the pass manager's instruments)
        self.instruments = list(instruments)

    def get(self, name: str | type, gm: fx.GraphModule, ctx: Any = None) -> Any:
        key = name if isinstance(name, str) else name.name
        cached = key in self._cache
        for inst in self.instruments:
            getattr(inst, "before_analysis", _ignore)(key, gm, ctx)
        t0 = time.perf_counter()
        if not cached:
            self._cache[key] = get_analysis(key)().run(gm, ctx)
            self.computed[key] = self.computed.get(key, 0) + 1
        seconds = 0.0 if cached else time.perf_counter() - t0
        for inst in self.instruments:
            getattr(inst, "after_analysis", _ignore)(key, gm, ctx, self._cache[key], cached, seconds)
        return self._cache[key]

    def cached(self) -> list[str]:
        return list(self._cache)

    def invalidate(self, result: Any = None) -> None:
        """Drop what ``result`` (a PassResult) does not preserve; everything when None."""
        if result is None:
            self._cache.clear()
            return
        for key in list(self._cache):
            if not result.preserves(key):
                del self._cache[key]

    def check(self, gm: fx.GraphModule, ctx: Any = None, result: Any = None) -> list[str]:
        """Names of cached analyses that no longer match a fresh computation; with ``result`` (a
        PassResult), only those it claims to preserve (the manager's ``check_preserved``)."""
        stale = []
        for key, cached in self._cache.items():
            if result is not None and not result.preserves(key):
                continue
            analysis = get_analysis(key)()
            if not analysis.same(cached, analysis.run(gm, ctx), gm):
                stale.append(key)
        return stale

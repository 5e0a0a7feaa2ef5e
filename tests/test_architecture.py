"""The layout's rules, checked on the source: no import cycles, the core never imports a pass, every
registered pass and analysis and every kernel module is exercised by some test."""
from __future__ import annotations

import ast
import os

import networkx as nx
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOPS = {"fxopt": ["fxopt"], "passes": ["fxopt", "passes"], "kernels": ["fxopt", "kernels"]}


def _modules() -> dict[str, str]:
    out = {}
    for top, prefix in TOPS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, top))[:-3].split(os.sep)
                    parts = prefix + rel
                    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, f)
    return out


def _import_graph() -> nx.DiGraph:
    """Every fxopt-internal import (module level and inside functions) as an edge."""
    mods, g = _modules(), nx.DiGraph()
    for mod, path in mods.items():
        g.add_node(mod)
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{mod}: relative import 'from {'.' * node.level}{node.module or ''}' (use absolute)")
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    g.add_edge(mod, t)
    return g


def test_there_are_no_import_cycles():
    g = _import_graph()
    # the package root is the lazy facade (it imports its submodules on first use of a public name);
    # submodules that `import fxopt` use that public API at call time
    g.remove_node("fxopt")
    cycles = sorted(nx.simple_cycles(g), key=len)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_the_core_never_imports_a_pass():
    # passes are found through the registries (get_pass, get_analysis); shared code lives in the core
    allowed = {"fxopt"}  # the package root imports fxopt.passes once, to register the built-ins
    bad = [(a, b) for a, b in _import_graph().edges
           if not a.startswith("fxopt.passes") and b.startswith("fxopt.passes") and a not in allowed]
    assert not bad, bad


def test_the_ir_is_the_bottom_layer():
    bad = [(a, b) for a, b in _import_graph().edges
           if a.startswith("fxopt.ir") and not b.startswith("fxopt.ir") and b != "fxopt.errors"]
    assert not bad, bad


def test_kernels_do_not_import_passes_or_the_pass_manager():
    bad = [(a, b) for a, b in _import_graph().edges
           if a.startswith("fxopt.kernels") and b.startswith(("fxopt.passes", "fxopt.passmgr"))]
    assert not bad, bad


def _test_text() -> str:
    texts = []
    for dirpath, _, files in os.walk(os.path.dirname(__file__)):
        texts += [open(os.path.join(dirpath, f)).read() for f in files if f.endswith(".py")]
    return "\n".join(texts)


def test_every_registered_pass_analysis_and_kernel_module_is_tested():
    import fxopt
    text = _test_text()
    registered = {**fxopt.list_passes(), **fxopt.list_analyses()}
    # the passes in fxopt.passes (a pass a test or the README registers, in any order, is not the package's)
    untested = [n for n, cls in registered.items()
                if (getattr(cls, "__module__", None) or "").startswith("fxopt.passes.") and not n.startswith(("test-", "t-")) and n not in fxopt.recipes and f'"{n}' not in text
                and f"'{n}" not in text and f"{n}(" not in text and f",{n}" not in text
                and cls.__name__ not in text]
    assert not untested, f"passes/analyses no test names: {untested}"
    kernels = [m for m in _modules() if m.startswith("fxopt.kernels.")]
    missing = [m for m in kernels if m.rsplit(".", 1)[1] not in text]
    assert not missing, missing


def test_pyproject_installs_every_package():
    # a subpackage missing from [tool.setuptools] packages is left out of a (non-editable) install
    import re
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    listed = set(re.findall(r'"(fxopt[\w.]*)"', text.split("[tool.setuptools]")[1].split("[tool.setuptools.package-dir]")[0]))
    packages = {m for m, path in _modules().items() if path.endswith("__init__.py")}
    assert packages == listed, (sorted(packages - listed), sorted(listed - packages))

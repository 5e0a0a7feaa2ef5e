"""The textual pipeline syntax's values: how option values print in a pipeline string.

A leaf module (no fxopt imports), so the pass base and the pipeline parser both use it
without importing each other.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["format_value", "format_options"]

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/\-]*$")
_KEYWORDS = {"true": True, "false": False, "none": None}


def format_value(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "none"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple, frozenset, set)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else v
        return "[" + ",".join(format_value(x) for x in items) + "]"
    s = str(v)
    if _BARE.match(s) and s not in _KEYWORDS:
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_options(opts: dict) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in opts.items())

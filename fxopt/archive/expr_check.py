"""The two small grammars for strings torch evaluates when it loads a graph.

``sympy.sympify`` runs on every symbolic-shape expression in ``model.json``
(it evaluates Python), and the ``guards_code`` strings are ``exec``'d as the
body of a guard function when the module is built. Both are checked here
without evaluating anything:

* an expression is tokenized and parsed by recursive descent: symbols
  (``s0``, ``u3``, or ``Symbol('s77', positive=True, integer=True)`` as
  ``srepr`` writes them), integers, ``Integer``/``Rational``/``Float``,
  ``+ - * / // % **``, parentheses, and the sympy/torch function names torch's
  deserializer defines (``FloorDiv``, ``Mod``, ``Max``, ...). Exponents and shift
  amounts are small integers or symbols and powers do not nest, so no
  expression makes sympy build a huge number;
* a guard is parsed with :func:`ast.parse` and its tree may hold only
  comparisons, boolean operators and arithmetic over integers and input sizes
  (``L['x'].size()[0]``).
"""
from __future__ import annotations

import ast
import re

__all__ = ["GraphRefused", "check_sym_expr", "check_guard"]


class GraphRefused(Exception):
    """Raised with ``what`` (what is wrong) and ``at`` (a JSON path); the archive check makes a LoadError of it."""

    def __init__(self, what: str, at: str = ""):
        self.what, self.at = what, at
        super().__init__(f"{what} (at {at})" if at else what)


_SYMBOL = re.compile(r"[a-z]{1,3}[0-9]{1,9}\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"}
_FUNCS = {"Add", "Mul", "Mod", "Max", "Min", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
          "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
          "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
          "CeilDiv", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
          "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"}
_CONSTANTS = {"true", "false", "True", "False", "oo"}
_ASSUMPTIONS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
                "nonzero", "even", "odd", "rational", "extended_real", "commutative"}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^'\\\n]*')|(?P<op>\*\*|//|[-+*/%(),=]))")
_FLOAT_TEXT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,4})?\Z")


class _ExprParser:
    """Recursive descent over the token list; it accepts, or raises GraphRefused."""

    def __init__(self, text: str):
        if len(text) > 8192:
            raise GraphRefused("expression longer than 8192 characters")
        self.toks: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                if text[pos:].strip() == "":
                    break
                raise GraphRefused(f"unexpected character {text[pos]!r}")
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
            pos = m.end()
        self.i, self.depth = 0, 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        k, v = self.peek()
        if (value is not None and v != value) or (kind is not None and k != kind) or k == "end":
            raise GraphRefused(f"unexpected {v or 'end'!r}")
        self.i += 1
        return v

    def parse(self) -> None:
        self.expr()
        if self.peek()[0] != "end":
            raise GraphRefused(f"unexpected {self.peek()[1]!r}")

    # each rule returns whether what it parsed contains a power: the base of a
    # power may not, so no nesting of small exponents builds a huge number
    def expr(self) -> bool:
        self.depth += 1
        if self.depth > 64:
            raise GraphRefused("expression nested too deeply")
        has = self.term()
        while self.peek()[1] in ("+", "-"):
            self.take()
            has |= self.term()
        self.depth -= 1
        return has

    def term(self) -> bool:
        has = self.unary()
        while self.peek()[1] in ("*", "/", "//", "%"):
            self.take()
            has |= self.unary()
        return has

    def unary(self) -> bool:
        if self.peek()[1] in ("+", "-"):
            self.take()
            return self.unary()
        has = self.atom()
        if self.peek()[1] == "**":
            if has:
                raise GraphRefused("nested powers")
            self.take()
            self.exponent()
            has = True
        return has

    def integer(self, limit: int = 10 ** 30) -> int:
        sign = -1 if self.peek()[1] == "-" and self.take() else 1
        v = self.take(kind="num")
        if not v.isdigit() or int(v) > limit:
            raise GraphRefused(f"integer {v[:40]} out of range")
        return sign * int(v)

    def exponent(self) -> None:
        """The exponent of a power or shift: a small integer or a symbol, so nothing grows huge."""
        k, v = self.peek()
        if k == "num" or v == "-":
            self.integer(limit=64)
        elif v == "Integer":
            self.take()
            self.take("(")
            self.integer(limit=64)
            self.take(")")
        elif v == "Symbol":
            self.take()
            self.call("Symbol")
        elif k == "name" and _SYMBOL.match(v):
            self.take()
        else:
            raise GraphRefused("exponents must be small integers or symbols")

    def atom(self) -> bool:
        k, v = self.peek()
        if k == "num":
            if len(v) > 40 or (v.isdigit() and len(v) > 30):
                raise GraphRefused("number too long")
            self.take()
        elif v == "(":
            self.take()
            has = self.expr()
            self.take(")")
            return has
        elif k == "name":
            self.take()
            if self.peek()[1] == "(":
                return self.call(v)
            if not (_SYMBOL.match(v) or v in _CONSTANTS):
                raise GraphRefused(f"unknown name {v!r}")
        else:
            raise GraphRefused(f"unexpected {v or 'end'!r}")
        return False

    def call(self, fn: str) -> bool:
        self.take("(")
        has = False
        if fn == "Symbol":
            s = self.take(kind="str")[1:-1]
            if not _SYMBOL.match(s):
                raise GraphRefused(f"{s!r} is not a symbol name")
            while self.peek()[1] == ",":
                self.take()
                if self.take(kind="name") not in _ASSUMPTIONS:
                    raise GraphRefused("unknown symbol assumption")
                self.take("=")
                if self.take(kind="name") not in ("True", "False"):
                    raise GraphRefused("symbol assumptions are True or False")
        elif fn == "Integer":
            self.integer()
        elif fn == "Rational":
            self.integer()
            self.take(",")
            self.integer()
        elif fn == "Float":
            if self.peek()[0] == "str":
                if not _FLOAT_TEXT.match(self.take()[1:-1]):
                    raise GraphRefused("bad Float text")
            elif self.peek()[0] != "num":
                raise GraphRefused("Float takes a number")
            else:
                self.atom()
            if self.peek()[1] == ",":
                self.take()
                if self.take(kind="name") != "precision":
                    raise GraphRefused("Float takes only precision=")
                self.take("=")
                self.integer(limit=1024)
        elif fn in _POWERS:
            if self.expr():
                raise GraphRefused("nested powers")
            self.take(",")
            self.exponent()
            has = True
        elif fn in _FUNCS:
            has = self.expr()
            while self.peek()[1] == ",":
                self.take()
                has |= self.expr()
        else:
            raise GraphRefused(f"function {fn!r} is not allowed")
        self.take(")")
        return has


def check_sym_expr(text: str) -> None:
    """Accept a symbolic-shape expression string only if it is plain arithmetic.

    >>> check_sym_expr("Mul(Integer(2), Symbol('s77', positive=True, integer=True))")
    >>> check_sym_expr("s0 // 2 + 1")
    >>> check_sym_expr("__import__('os')")
    Traceback (most recent call last):
    ...
    fxopt.archive.expr_check.GraphRefused: function '__import__' is not allowed
    """
    _ExprParser(text).parse()


_GUARD_CMP = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_GUARD_BIN = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div)
_GUARD_FUNCS = {"torch": {"sym_min", "sym_max", "sym_int", "sym_float", "sym_not", "sym_sqrt"},
                "math": {"floor", "ceil", "trunc"}}
_GUARD_BUILTINS = {"min", "max", "abs"}  # torch 2.13 prints min(512, ...) where 2.14 prints torch.sym_min


def _guard_input(n: ast.AST) -> bool:
    """``L['x']``, ``L['x'][0]``, ``L['kw']['key']``: a reference to one flattened input."""
    while isinstance(n, ast.Subscript):
        key = n.slice
        if not (isinstance(key, ast.Constant) and
                ((type(key.value) is str and _IDENT.match(key.value)) or (type(key.value) is int and key.value >= 0))):
            return False
        n = n.value
    return isinstance(n, ast.Name) and n.id == "L"


def _guard_value(n: ast.AST, depth: int = 0) -> None:
    if depth > 64:
        raise GraphRefused("guard nested too deeply")
    d = depth + 1
    if isinstance(n, ast.Constant) and type(n.value) in (int, float, bool):
        return
    if isinstance(n, ast.BoolOp):
        return [_guard_value(x, d) for x in n.values] and None
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Not, ast.USub, ast.UAdd)):
        return _guard_value(n.operand, d)
    if isinstance(n, ast.Compare) and all(isinstance(op, _GUARD_CMP) for op in n.ops):
        return [_guard_value(x, d) for x in (n.left, *n.comparators)] and None
    if isinstance(n, ast.BinOp) and isinstance(n.op, _GUARD_BIN):
        return [_guard_value(x, d) for x in (n.left, n.right)] and None
    if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow):
        if isinstance(n.right, ast.Constant) and type(n.right.value) is int and abs(n.right.value) <= 64 \
                and not any(isinstance(x, ast.BinOp) and isinstance(x.op, ast.Pow) for x in ast.walk(n.left)):
            return _guard_value(n.left, d)
        raise GraphRefused("powers in guards must have a small integer exponent")
    if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Call):  # L['x'].size()[0]
        call, idx = n.value, n.slice
        if isinstance(call.func, ast.Attribute) and call.func.attr in ("size", "stride") and \
                not call.args and not call.keywords and _guard_input(call.func.value) and \
                isinstance(idx, ast.Constant) and type(idx.value) is int and 0 <= idx.value < 64:
            return
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and \
            n.func.attr in ("storage_offset", "dim", "numel") and not n.args and not n.keywords and \
            _guard_input(n.func.value):
        return
    if isinstance(n, ast.Call) and not n.keywords and 0 < len(n.args) <= 8 and (
            (isinstance(n.func, ast.Name) and n.func.id in _GUARD_BUILTINS) or
            (isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and
             n.func.attr in _GUARD_FUNCS.get(n.func.value.id, ()))):
        return [_guard_value(x, d) for x in n.args] and None   # torch.sym_min(512, L['x'].size()[1])
    if _guard_input(n):
        return
    raise GraphRefused(f"{type(n).__name__} is not allowed in a guard")


def check_guard(text: str) -> None:
    """Accept a guard string only if it compares input sizes and numbers.

    >>> check_guard("L['x'].size()[1] == 6")
    >>> check_guard("L['a'].size()[0] == L['b'].size()[0] and L['a'].size()[0] >= 2")
    """
    if len(text) > 8192 or not text.isprintable():
        raise GraphRefused("guard too long or with control characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise GraphRefused("guard is not an expression") from e
    _guard_value(tree.body)

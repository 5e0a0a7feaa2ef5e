"""Whitelist check of a saved graph (``archive/models/model.json``) before torch reads it.

torch's deserializer trusts that file. It hands symbolic-shape strings to
``sympy.sympify`` (which evaluates Python), resolves any dotted ``torch.*``,
``_operator.*`` or ``math.*`` attribute as a node target (called when the
graph is retraced at load), ``exec``s the ``guards_code`` strings when it
builds the module, imports any module a pytree context names, and writes node
names and ``forward_arg_names`` into generated Python source. So a graph is
accepted only if every part of it is on a whitelist:

* every field is one ``torch.export.save`` writes for an fxopt model, with the
  JSON type it should have; anything else is refused (a newer torch may add
  fields: the message then says to upgrade fxopt);
* expression and guard strings follow the small grammars of :mod:`fxopt.archive.expr_check`;
* node targets are ``torch.ops.aten.*`` (except the ops that touch files),
  ``torch.ops.fxopt.*`` and a few ``_operator``/``math``/``torch.sym_*`` functions;
* names are identifiers; pytree specs use registered containers with plain contexts.

Nothing here evaluates the file's strings: they are tokenized, or parsed with ``ast``.
"""
from __future__ import annotations

import functools
import json
import keyword
import re
from typing import Any, Callable

import torch

from fxopt.archive.expr_check import GraphRefused, check_guard, check_sym_expr

__all__ = ["GraphRefused", "check_graph_json", "check_target", "check_treespec", "DTYPE_SIZES", "TENSOR_DEVICES"]


# serialized ScalarType value -> bytes per element (torch/_export/serde/schema.py numbering)
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
               28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
TENSOR_DEVICES = {"cpu", "cuda", "meta", "mps", "xpu"}
_STRIDED = 7
_LAYOUTS = set(range(8))
_MEMORY_FORMATS = set(range(5))
_MAX_DEPTH = 200
_MAX_STR = 1 << 20
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_SYMBOL = re.compile(r"[a-z]{1,3}[0-9]{1,9}\Z")


# ----------------------------------------------------------------------------- scalar rules

def _str(v: Any, at: str, newlines: bool = False) -> str:
    if not isinstance(v, str):
        raise GraphRefused(f"expected a string, found {type(v).__name__}", at)
    if len(v) > _MAX_STR or "\r" in v or "\x00" in v or (not newlines and "\n" in v):
        raise GraphRefused("string too long or with control characters", at)
    return v


def _name(v: Any, at: str) -> None:
    """A value or argument name: it becomes a Python identifier in generated code."""
    if not (isinstance(v, str) and len(v) <= 256 and _IDENT.match(v)) or keyword.iskeyword(v) \
            or v.startswith("__"):
        raise GraphRefused(f"{v!r} is not a plain identifier", at)


def _dotted(v: Any, at: str, empty: bool = False) -> None:
    """A module path or parameter name (``layers.0.weight``): identifiers or indices, no dunders."""
    if empty and v == "":
        return
    if not (isinstance(v, str) and len(v) <= 1024 and _DOTTED.match(v)) or \
            any(p.startswith("__") for p in v.split(".")):
        raise GraphRefused(f"{v!r} is not a dotted name", at)


def _int(v: Any, at: str, lo: int = -(1 << 63), hi: int = (1 << 63) - 1) -> None:
    if type(v) is not int or not lo <= v <= hi:
        raise GraphRefused(f"expected an integer in [{lo}, {hi}], found {v!r:.40}", at)


def _opt_int(v: Any, at: str) -> None:
    if v is not None:
        _int(v, at)


def _bool(v: Any, at: str) -> None:
    if type(v) is not bool:
        raise GraphRefused(f"expected true/false, found {v!r:.40}", at)


def _opt_bool(v: Any, at: str) -> None:
    if v is not None:
        _bool(v, at)


def _float(v: Any, at: str) -> None:
    if type(v) not in (int, float):
        raise GraphRefused(f"expected a number, found {v!r:.40}", at)


def _enum(values: set) -> Callable[[Any, str], None]:
    def check(v: Any, at: str) -> None:
        if type(v) is not int or v not in values:
            raise GraphRefused(f"unknown enum value {v!r:.40}", at)
    return check


def _list(item: Callable[[Any, str], None], limit: int = 1 << 24) -> Callable[[Any, str], None]:
    def check(v: Any, at: str) -> None:
        if not isinstance(v, list) or len(v) > limit:
            raise GraphRefused("expected a list", at)
        for i, x in enumerate(v):
            item(x, f"{at}[{i}]")
    return check


def _opt(rule: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    return lambda v, at: None if v is None else rule(v, at)


# ----------------------------------------------------------------------------- structures

def _struct(v: Any, at: str) -> None:
    """A schema object: every key must be a known field, checked by that field's rule."""
    if not isinstance(v, dict):
        raise GraphRefused(f"expected an object, found {type(v).__name__}", at)
    if at.count(".") + at.count("[") > _MAX_DEPTH:
        raise GraphRefused("nested too deeply", at)
    for k, x in v.items():
        rule = _FIELDS.get(k)
        if rule is None:
            raise GraphRefused(f"unknown field {k!r:.60}", at)
        rule(x, f"{at}.{k}")


def _map(key: Callable[[Any, str], None], value: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def check(v: Any, at: str) -> None:
        if not isinstance(v, dict):
            raise GraphRefused("expected an object", at)
        for k, x in v.items():
            key(k, at)
            value(x, f"{at}[{k!r:.60}]")
    return check


def _empty(v: Any, at: str) -> None:
    if v not in ({}, None):
        raise GraphRefused("custom (script) objects are not accepted: they load through pickle", at)


def _graph(v: Any, at: str) -> None:
    _struct(v, at)
    for i, inp in enumerate(v.get("inputs", [])):
        # a constant graph input ends up inside generated guard code as text: only these kinds
        if not (isinstance(inp, dict) and len(inp) == 1 and
                next(iter(inp)) in ("as_tensor", "as_sym_int", "as_int", "as_float", "as_bool", "as_none")):
            raise GraphRefused("graph inputs must be tensors, symbolic ints or plain numbers", f"{at}.inputs[{i}]")


def _node(v: Any, at: str) -> None:
    _struct(v, at)
    if "target" not in v:
        raise GraphRefused("node without a target", at)


_META_KEYS = {"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node", "custom"}
_NN_PATH = re.compile(r"torch\.nn(\.[A-Za-z][A-Za-z0-9_]*)+\Z")


def _json_data(v: Any, at: str, depth: int = 0) -> None:
    if depth > 64:
        raise GraphRefused("nested too deeply", at)
    if isinstance(v, dict):
        for k, x in v.items():
            _str(k, at)
            _json_data(x, at, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _json_data(x, at, depth + 1)
    elif isinstance(v, str):
        _str(v, at)
    elif not (v is None or type(v) in (bool, int, float)):
        raise GraphRefused("unexpected value", at)


def _metadata(v: Any, at: str) -> None:
    if not isinstance(v, dict):
        raise GraphRefused("expected an object", at)
    for k, x in v.items():
        if k not in _META_KEYS:
            raise GraphRefused(f"unknown metadata {k!r:.60}", at)
        _str(x, f"{at}.{k}", newlines=(k == "stack_trace"))
        if k == "source_fn_stack":
            _source_fn_stack(x, f"{at}.{k}")
        if k in ("from_node", "custom"):
            try:
                data = json.loads(x)
            except (ValueError, RecursionError) as e:
                raise GraphRefused(f"metadata {k} is not JSON", at) from e
            _json_data(data, f"{at}.{k}")


def _source_fn_stack(v: str, at: str) -> None:
    """``name,target;...``: torch resolves each target by attribute lookup (``torch.*``, ``math.*``...)."""
    for item in v.split(";"):
        name, _, target = item.partition(",")
        _name(name, at)
        if _NN_PATH.match(target) or (_IDENT.match(target) and not target.startswith(("torch", "math", "_operator"))):
            continue
        try:
            check_target(target)
        except GraphRefused:
            raise GraphRefused(f"source function {target[:80]!r} is not an operator or torch.nn name", at) from None


def _symbol_name(v: Any, at: str) -> None:
    if not (isinstance(v, str) and _SYMBOL.match(v)):
        raise GraphRefused(f"{v!r:.60} is not a symbol name", at)


def _sym_expr_field(v: Any, at: str) -> None:
    try:
        check_sym_expr(_str(v, at))
    except GraphRefused as e:
        raise GraphRefused(f"expression {v!r:.80} refused: {e.what}", at) from None


def _guard_field(v: Any, at: str) -> None:
    try:
        check_guard(_str(v, at))
    except GraphRefused as e:
        raise GraphRefused(f"guard {v!r:.80} refused: {e.what}", at) from None


def _target_field(v: Any, at: str) -> None:
    try:
        check_target(_str(v, at))
    except GraphRefused as e:
        raise GraphRefused(e.what, at) from None


def _treespec_field(v: Any, at: str) -> None:
    try:
        check_treespec(_str(v, at))
    except GraphRefused as e:
        raise GraphRefused(f"input/output structure refused: {e.what}", at) from None


def _device_type(v: Any, at: str) -> None:
    if not isinstance(v, str) or v not in TENSOR_DEVICES:
        raise GraphRefused(f"unknown device type {v!r:.40}", at)


def _constant_value(v: Any, at: str) -> None:
    kinds = {"as_none", "as_int", "as_float", "as_bool", "as_string"}
    if not (isinstance(v, dict) and len(v) == 1 and set(v) <= kinds):
        raise GraphRefused("a constant input must be one none/int/float/bool/string", at)
    _struct(v, at)


_S = _struct
_FIELDS: dict[str, Callable[[Any, str], None]] = {
    # ExportedProgram
    "graph_module": _S, "opset_version": _map(_name, _int), "range_constraints": _map(_symbol_name, _S),
    "min_val": _opt_int, "max_val": _opt_int, "schema_version": _S, "major": _int, "minor": _int,
    "verifiers": _list(_name, 16), "torch_version": lambda v, at: _str(v, at) and None,
    "guards_code": _list(_guard_field, 1 << 16),
    # GraphModule and Graph
    "graph": _graph, "signature": _opt(_S), "module_call_graph": _list(_S), "metadata": _metadata,
    "treespec_namedtuple_fields": _map(_dotted, _S), "field_names": _list(_name),
    "inputs": _list(_S), "outputs": _list(_S), "nodes": _list(_node), "is_single_tensor_return": _bool,
    "tensor_values": _map(_name, _S), "sym_int_values": _map(_name, _S), "sym_float_values": _map(_name, _S),
    "sym_bool_values": _map(_name, _S), "custom_obj_values": _empty,
    # Node, NamedArgument
    "target": _target_field, "name": _name, "arg": _S, "kind": _opt_int, "is_hop_single_tensor_return": _opt_bool,
    # TensorMeta, Device, SymInt
    "dtype": _enum(set(DTYPE_SIZES)), "sizes": _list(_S, 64), "strides": _list(_S, 64), "storage_offset": _S,
    "requires_grad": _bool, "device": _S, "type": _device_type, "index": _opt_int, "layout": _enum({_STRIDED}),
    "as_expr": _S, "expr_str": _sym_expr_field, "hint": _opt(_S),
    # Argument kinds (a union object has one of these keys)
    "as_none": _opt_bool, "as_tensor": _S, "as_tensors": _list(_S), "as_optional_tensors": _list(_S),
    "as_int": _int, "as_ints": _list(_int), "as_float": _float, "as_floats": _list(_float),
    "as_bool": _bool, "as_bools": _list(_bool), "as_string": lambda v, at: _str(v, at) and None,
    "as_strings": _list(lambda v, at: _str(v, at) and None), "as_scalar_type": _enum(set(DTYPE_SIZES)),
    "as_memory_format": _enum(_MEMORY_FORMATS), "as_layout": _enum(_LAYOUTS), "as_device": _S,
    "as_complex": _S, "real": _float, "imag": _float, "as_name": _name,
    "as_sym_int": _S, "as_sym_ints": _list(_S), "as_sym_float": _S, "as_sym_floats": _list(_S),
    "as_sym_bool": _S, "as_sym_bools": _list(_S),
    # GraphSignature: only the spec kinds an inference model has
    "input_specs": _list(_S), "output_specs": _list(_S), "parameter": _S, "buffer": _S, "tensor_constant": _S,
    "user_input": _S, "user_output": _S, "parameter_name": _dotted, "buffer_name": _dotted,
    "tensor_constant_name": _dotted, "persistent": _opt_bool,
    # a keyword input captured as a constant (use_cache=False): its value is one plain scalar
    "constant_input": _S, "value": _constant_value,
    # ModuleCallGraph
    "fqn": lambda v, at: _dotted(v, at, empty=True), "in_spec": _treespec_field, "out_spec": _treespec_field,
    "forward_arg_names": _opt(_list(_name)),
}


def check_graph_json(doc: Any) -> None:
    """Check a parsed ``model.json``; raises :class:`GraphRefused` naming the first field refused."""
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise GraphRefused("model.json is not a torch.export program")
    _struct(doc, "model")


# ----------------------------------------------------------------------------- node targets

_OPERATOR_FUNCS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
                   "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs"}
_MATH_FUNCS = {"ceil", "floor", "trunc", "sqrt"}
_TORCH_FUNCS = {"sym_int", "sym_float", "sym_not", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_sum"}
_OP_NAMESPACES = {"aten", "fxopt"}
_REFUSED_ATEN = {"from_file", "save", "_print"}  # read or write files, or print at load
_DUNDER_OP = re.compile(r"__[a-z]+__\Z")


@functools.lru_cache(maxsize=4096)
def check_target(text: str) -> None:
    """Accept a node target only if it is a whitelisted operator or function.

    >>> check_target("torch.ops.aten.linear.default")
    >>> check_target("torch.utils.cpp_extension.load_inline")
    Traceback (most recent call last):
    ...
    fxopt.archive.expr_check.GraphRefused: node target 'torch.utils.cpp_extension.load_inline' is not an allowed operator
    """
    parts = text.split(".")
    # aten has dunder operator names (aten.__and__.Tensor); nothing else may start with "__"
    if any(not _IDENT.match(p) or (p.startswith("__") and not (i == 3 and _DUNDER_OP.match(p)))
           for i, p in enumerate(parts)):
        raise GraphRefused(f"node target {text[:80]!r} is not an allowed operator")
    head = ".".join(parts[:-1])
    if len(parts) == 2 and ((head == "_operator" and parts[1] in _OPERATOR_FUNCS) or
                            (head == "math" and parts[1] in _MATH_FUNCS) or
                            (head == "torch" and parts[1] in _TORCH_FUNCS)):
        return
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES:
        ns, op, overload = parts[2:]
        if ns == "aten" and op in _REFUSED_ATEN:
            raise GraphRefused(f"node target {text!r} touches files; fxopt does not load graphs that use it")
        try:  # torch.ops looks operators up in the dispatcher's registry; this runs no file-chosen code
            obj = getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError) as e:
            hint = "upgrade fxopt" if ns == "fxopt" else "it may need a newer torch"
            raise GraphRefused(f"node target {text!r} is not an operator this process defines ({hint})") from e
        schema = getattr(obj, "_schema", None)
        if isinstance(obj, torch._ops.OpOverload) and getattr(schema, "name", None) == f"{ns}::{op}":
            return
    raise GraphRefused(f"node target {text[:80]!r} is not an allowed operator")


# ----------------------------------------------------------------------------- pytree specs

_CONTAINERS = {"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
               "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict"}
_NAMEDTUPLE = "collections.namedtuple"


def _registered_plain(name: str) -> bool:
    """A container registered with pytree whose context is plain JSON (a ModelOutput, say).

    Types with their own context decoder (``collections.defaultdict`` imports a module
    named in the file) are refused; this looks names up, it imports nothing.
    """
    import torch.utils._pytree as pytree
    typ = getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {}).get(name)
    node_def = getattr(pytree, "SUPPORTED_SERIALIZED_TYPES", {}).get(typ) if typ is not None else None
    return node_def is not None and getattr(node_def, "from_dumpable_context", 1) is None \
        and name != "NO_SERIALIZED_TYPE_NAME_FOUND"


def _plain_context(v: Any, strict: bool, depth: int = 0) -> None:
    # no JSON objects: pytree decodes {"__enum__": ..., "fqn": "module:attr"} by importing the module
    if depth > 32:
        raise GraphRefused("context nested too deeply")
    if isinstance(v, list):
        for x in v:
            _plain_context(x, strict, depth + 1)
    elif isinstance(v, str):
        if len(v) > 1024 or not v.isprintable() or (strict and not _IDENT.match(v)):
            raise GraphRefused(f"context key {v[:60]!r} refused")
    elif not (v is None or type(v) in (bool, int, float)):
        raise GraphRefused("contexts may hold only lists, strings and numbers")


def _spec_node(n: Any, depth: int) -> None:
    if depth > 64:
        raise GraphRefused("nested too deeply")
    if not (isinstance(n, dict) and set(n) == {"type", "context", "children_spec"} and
            isinstance(n["children_spec"], list)):
        raise GraphRefused("malformed tree spec")
    t, ctx, kids = n["type"], n["context"], n["children_spec"]
    if t is None:
        if ctx is not None or kids:
            raise GraphRefused("malformed leaf")
        return
    if isinstance(t, str) and ":" in t:
        _library_type(t)
        if not isinstance(ctx, str):
            raise GraphRefused("context must be a JSON string")
        try:
            _library_context(json.loads(ctx), 0)
        except (ValueError, RecursionError) as e:
            raise GraphRefused("context is not JSON") from e
        for k in kids:
            _spec_node(k, depth + 1)
        return
    _dotted(t, "type")
    if t not in _CONTAINERS and t != _NAMEDTUPLE and not _registered_plain(t):
        _import_library_module(t.rpartition(".")[0])  # a ModelOutput registers when its module is imported
    if t == _NAMEDTUPLE:
        _dotted(ctx, "context")
    elif t in _CONTAINERS or _registered_plain(t):
        if ctx is not None:
            if not isinstance(ctx, str):
                raise GraphRefused("context must be a JSON string")
            try:
                _plain_context(json.loads(ctx), strict=t not in _CONTAINERS)
            except (ValueError, RecursionError) as e:
                raise GraphRefused("context is not JSON") from e
    else:
        raise GraphRefused(f"container type {t!r} is not a known pytree container "
                           "(import the library that defines it before loading)")
    for k in kids:
        _spec_node(k, depth + 1)


#: libraries whose container types (``module:Class``) a saved output may hold, e.g. the cache a
#: Hugging Face decoder returns; importing them is what the user's own code does
_TYPE_LIBRARIES = ("transformers.cache_utils",)


_LIBRARY_MODULE = re.compile(r"transformers\.(modeling_outputs|cache_utils|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)\Z")


def _import_library_module(module: str) -> None:
    """Import a transformers module that defines output types (nothing else): in a fresh process its
    ``ModelOutput`` classes are not registered with pytree until it is imported."""
    if _LIBRARY_MODULE.match(module):
        import importlib
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _library_type(name: str) -> None:
    """A ``module:Class`` pytree type: only from a known library module, and only pytree-registered classes.

    transformers' cache classes are registered when a model that returns them is captured; in a
    fresh process fxopt registers them here (after checking the class really is one of that
    library's caches), the way capture does.
    """
    module, _, qual = name.partition(":")
    if module not in _TYPE_LIBRARIES or not _IDENT.match(qual):
        raise GraphRefused(f"container type {name[:80]!r} is not from a library fxopt knows")
    if not _registered_plain(name):
        from fxopt.ir.capture import register_hf_cache_class
        register_hf_cache_class(module, qual)
    if not _registered_plain(name):
        raise GraphRefused(f"container type {name[:80]!r} is not a known pytree container "
                           "(import the library that defines it before loading)")


_DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128"}
_CTX_TAGS = {"tensor", "sym", "size", "device", "dtype", "layout", "items", "type", "map", "seq", "obj"}
_DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu)(:[0-9]{1,4})?\Z")
_BUILTIN_PATHS = {"builtins:list", "builtins:tuple", "builtins:dict"}


def _library_class(path: Any) -> None:
    """A class a library context may rebuild: transformers' caches and cache layers, plain containers.

    transformers rebuilds such contexts by importing the ``module:Class`` path and calling it;
    any other path (``os:system``) would run code, so only these are accepted.
    """
    if not isinstance(path, str):
        raise GraphRefused("class path must be a string")
    if path in _BUILTIN_PATHS:
        return
    module, _, qual = path.partition(":")
    if module not in _TYPE_LIBRARIES or not _IDENT.match(qual):
        raise GraphRefused(f"context names class {path[:80]!r}, which fxopt does not rebuild")
    from transformers import cache_utils
    cls = getattr(cache_utils, qual, None)
    bases = tuple(b for b in (getattr(cache_utils, "Cache", None), getattr(cache_utils, "CacheLayerMixin", None))
                  if isinstance(b, type))
    if not (isinstance(cls, type) and bases and issubclass(cls, bases)):
        raise GraphRefused(f"context names {path[:80]!r}, which is not a transformers cache class")


def _library_context(c: Any, depth: int) -> None:
    """transformers' cache contexts (see ``exporter_dynamo``): every tag, class path and name checked."""
    if depth > 64:
        raise GraphRefused("context nested too deeply")
    if c is None or type(c) in (bool, int, float):
        return
    if isinstance(c, str):
        if len(c) > 1024 or not c.isprintable():
            raise GraphRefused("context string refused")
        return
    if isinstance(c, list):
        for x in c:
            _library_context(x, depth + 1)
        return
    if not isinstance(c, dict):
        raise GraphRefused("unknown context value")
    if "_t" not in c:
        for k, v in c.items():
            _library_context(k, depth + 1)
            _library_context(v, depth + 1)
        return
    tag = c["_t"]
    if tag not in _CTX_TAGS:
        raise GraphRefused(f"unknown context tag {str(tag)[:40]!r}")
    if tag in ("tensor", "sym"):
        if set(c) != {"_t", "i"} or type(c["i"]) is not int:
            raise GraphRefused("malformed tensor reference in context")
    elif tag == "size":
        if set(c) != {"_t", "v"} or not isinstance(c["v"], list) or not all(type(v) is int for v in c["v"]):
            raise GraphRefused("malformed size in context")
    elif tag == "device":
        if set(c) != {"_t", "s"} or not isinstance(c["s"], str) or not _DEVICE.match(c["s"]):
            raise GraphRefused("malformed device in context")
    elif tag in ("dtype", "layout"):
        names = _DTYPE_NAMES if tag == "dtype" else {"strided", "sparse_coo"}
        if set(c) != {"_t", "n"} or c["n"] not in names:
            raise GraphRefused(f"unknown {tag} in context")
    elif tag == "items":
        if set(c) != {"_t", "v"} or not isinstance(c["v"], list):
            raise GraphRefused("malformed items in context")
        for pair in c["v"]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise GraphRefused("malformed items in context")
            _library_context(pair, depth + 1)
    elif tag == "type":
        if set(c) != {"_t", "p"}:
            raise GraphRefused("malformed type in context")
        _library_class(c["p"])
    else:  # map, seq, obj: an instance of a class rebuilt from its state
        key = "s" if tag == "obj" else "v"
        if set(c) != {"_t", "p", key}:
            raise GraphRefused(f"malformed {tag} in context")
        _library_class(c["p"])
        if tag == "obj" and not (isinstance(c["s"], dict) and all(isinstance(k, str) and _IDENT.match(k)
                                                                    for k in c["s"])):
            raise GraphRefused("object state must map attribute names to values")
        _library_context(c[key], depth + 1)


def check_treespec(text: str) -> None:
    """Accept a serialized pytree spec only with known containers and plain contexts."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise GraphRefused("tree spec is not JSON") from e
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1):
        raise GraphRefused("unknown tree spec protocol")
    _spec_node(doc[1], 0)

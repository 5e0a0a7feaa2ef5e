"""Crafted and damaged .fxopt files: loading never runs their code, and every failure is a LoadError.

The files are built from a real saved model. Every payload is live (``test_payloads_are_live``
runs each one outside fxopt and sees its marker): pickles whose ``__reduce__`` runs code,
``sympify`` and guard strings that call ``exec``, pytree contexts and a graph node that import
a module planted on ``sys.path``. Each crafted file goes through ``fxopt.load`` and through
``fxopt inspect FILE`` (``fxopt.cli.main.main``); the marker file and environment variable must
never appear.
"""
from __future__ import annotations

import copy
import doctest
import hashlib
import io
import json
import os
import pickle
import random
import struct
import sys
import tracemalloc
import zipfile

import pytest
import torch

import fxopt
import fxopt.archive.archive_check
import fxopt.archive.expr_check
import fxopt.archive.graph_check
from fxopt.cli.main import main as cli_main
from models import MLP

ENV = "FXOPT_FUZZ_PWNED"
MODULE = "fxopt_fuzz_payload_mod"
M, WCFG, CCFG, SAMPLE = ("archive/models/model.json", "archive/data/weights/model_weights_config.json",
                         "archive/data/constants/model_constants_config.json", "archive/data/sample_inputs/model.pt")


class _Payload:
    """Unpickling this runs ``code`` (a pickle's __reduce__ may name any callable)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Marker file, payloads, a payload module on sys.path, and the real saved model to mutate."""
    tmp = tmp_path_factory.mktemp("fuzz")
    marker = tmp / "PWNED"
    code = f"import os; os.environ[{ENV!r}] = '1'; open({str(marker)!r}, 'w').close()"
    (tmp / f"{MODULE}.py").write_text(code + "\nclass Evil:\n    apply = staticmethod(print)\n")
    raw = pickle.dumps(_Payload(code), protocol=2)
    buf = io.BytesIO()
    torch.save(_Payload(code), buf)
    torch.manual_seed(0)
    model = fxopt.compile(MLP().eval(), (torch.randn(4, 16),), progress=False)
    fxopt.save(model, tmp / "base.fxopt")
    with zipfile.ZipFile(tmp / "base.fxopt") as z:
        manifest = json.loads(z.read("manifest.json"))
        blob = z.read("model.pt2")
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        inner = {n: z.read(n) for n in z.namelist()}
    sys.path.insert(0, str(tmp))
    yield {"tmp": tmp, "marker": marker, "code": code, "py": f"__import__('builtins').exec({code!r})",
           "raw": raw, "saved": buf.getvalue(), "manifest": manifest, "blob": blob, "inner": inner,
           "outer": (tmp / "base.fxopt").read_bytes(), "model": model}
    sys.path.remove(str(tmp))


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, d in members.items():
            z.writestr(n, d)
    return buf.getvalue()


def _outer(e, blob: bytes, fix_sum: bool = True) -> bytes:
    manifest = copy.deepcopy(e["manifest"])
    if fix_sum:  # an attacker can always recompute the checksum
        manifest["sha256"]["model.pt2"] = hashlib.sha256(blob).hexdigest()
    return _zip({"manifest.json": json.dumps(manifest).encode(), "model.pt2": blob})


def _inner(e, edit) -> bytes:
    members = dict(e["inner"])
    edit(members)
    return _outer(e, _zip(members))


def _json(e, name, edit) -> bytes:
    def change(members):
        doc = json.loads(members[name])
        edit(doc)
        members[name] = json.dumps(doc).encode()
    return _inner(e, change)


def _graph(doc):
    return doc["graph_module"]["graph"]


def _patch(data: bytes, name: str, flags: int = 0, method: int | None = None, size: int | None = None) -> bytes:
    """Raw zip surgery on one member: OR flag bits, set the method or the declared size, in both headers."""
    out = bytearray(data)
    pos = struct.unpack("<L", data[-6:-2])[0]  # central directory offset (no comment, no zip64)
    while data[pos + 46:pos + 46 + struct.unpack("<H", data[pos + 28:pos + 30])[0]].decode() != name:
        pos += 46 + sum(struct.unpack("<3H", data[pos + 28:pos + 34]))
    local = struct.unpack("<L", data[pos + 42:pos + 46])[0]
    for head, off in ((pos, 8), (local, 6)):  # flags then method, in the central and the local header
        struct.pack_into("<H", out, head + off, struct.unpack("<H", data[head + off:head + off + 2])[0] | flags)
        if method is not None:
            struct.pack_into("<H", out, head + off + 2, method)
    if size is not None:
        struct.pack_into("<L", out, pos + 24, size)
        struct.pack_into("<L", out, local + 22, size)
    return bytes(out)


def _zeros_zip(members: dict[str, bytes], name: str, mb: int) -> bytes:
    """A real zip bomb: ``members`` plus ``name`` holding ``mb`` MB of zeros deflated to about 1/1000."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            if n != name:
                z.writestr(n, d)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            zero = bytes(1 << 20)
            for _ in range(mb):
                f.write(zero)
    return buf.getvalue()


def _dup(e) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in e["inner"].items():
            z.writestr(n, d)
        with pytest.warns(UserWarning, match="Duplicate"):
            z.writestr(M, e["raw"])
    return buf.getvalue()


# ----------------------------------------------------------------------------- the crafted files

def _add_constant(path_name: str, payload_key: str, use_pickle: bool = False):
    def edit(e):
        def change(m):
            cfg = json.loads(m[CCFG])
            cfg["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": use_pickle,
                                     "tensor_meta": None}
            m[CCFG] = json.dumps(cfg).encode()
            m[f"archive/data/constants/{path_name}"] = e[payload_key]
        return _inner(e, change)
    return edit


def _weights_entry(change):
    def edit(e):
        def f(doc):
            change(next(iter(doc["config"].values())), e)
        return _json(e, WCFG, f)
    return edit


def _first_node(change):
    def edit(e):
        return _json(e, M, lambda doc: change(_graph(doc)["nodes"][0], doc, e))
    return edit


def _retarget(target, args):
    def change(node, doc, e):
        node["target"] = target
        node["inputs"] = [{"name": f"a{i}", "arg": {"as_string": a.format(module=MODULE)}, "kind": 1}
                          for i, a in enumerate(args)]
    return _first_node(change)


def _expr(e, doc):
    for v in _graph(doc)["tensor_values"].values():
        for s in v["sizes"]:
            if "as_expr" in s:
                s["as_expr"]["expr_str"] = f"({e['py']}) or Symbol('s77', positive=True, integer=True)"


def _spec(doc, which, spec):
    doc["graph_module"]["module_call_graph"][0]["signature"][which] = json.dumps(spec)


_ENUM = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
    {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": None, "context": None,
                                                                       "children_spec": []}]},
    {"type": "builtins.dict", "context": json.dumps([{"__enum__": True, "fqn": f"{MODULE}:Evil", "name": "x"}]),
     "children_spec": []}]}]
_DEFAULTDICT = [1, {"type": "collections.defaultdict", "context": json.dumps(
    {"default_factory_module": MODULE, "default_factory_name": "Evil", "dict_context": []}),
    "children_spec": []}]


def _rename_value(old_to_new):
    def edit(e):
        def change(m):
            text = m[M].decode()
            for old, new in old_to_new(e).items():
                text = text.replace(json.dumps(old), json.dumps(new))
            m[M] = text.encode()
        return _inner(e, change)
    return edit


def _deep_json(e):
    return _inner(e, lambda m: m.__setitem__(M, b"[" * 100000 + b"]" * 100000))


CRAFTED = {
    # members added under every name torch might unpickle or execute
    "legacy weights .pt": lambda e: _inner(e, lambda m: m.__setitem__("archive/data/weights/model.pt", e["saved"])),
    "legacy constants .pt": lambda e: _inner(e, lambda m: m.__setitem__("archive/data/constants/model.pt",
                                                                        e["saved"])),
    "custom_obj constant": _add_constant("custom_obj_0", "raw"),
    "opaque_obj constant": _add_constant("opaque_obj_0", "raw"),
    "pickled tensor constant": _add_constant("tensor_0", "saved", use_pickle=True),
    "aotinductor library": lambda e: _inner(e, lambda m: m.update({
        "archive/data/aotinductor/model/model.so": b"\x7fELF" + bytes(64),
        "archive/data/aotinductor/model/model.wrapper.cpp": b"int x;"})),
    "second model json": lambda e: _inner(e, lambda m: m.update({
        "archive/models/evil.json": m[M], "archive/data/sample_inputs/evil.pt": e["saved"],
        "archive/data/weights/evil_weights_config.json": m[WCFG],
        "archive/data/constants/evil_constants_config.json": m[CCFG]})),
    "extra files": lambda e: _inner(e, lambda m: m.__setitem__("archive/extra/module_info.json", b"{}")),
    "pkl member": lambda e: _inner(e, lambda m: m.__setitem__("archive/data.pkl", e["raw"])),
    "orphan weight file": lambda e: _inner(e, lambda m: m.__setitem__("archive/data/weights/weight_99", bytes(8))),
    "old top-level format": lambda e: _inner(e, lambda m: m.update({
        "version": b"8.20", "serialized_exported_program.json": b"{}", "serialized_state_dict.json": e["saved"]})),
    "other archive prefix": lambda e: _inner(e, lambda m: m.update({
        n.replace("archive/", "evil/", 1): m.pop(n) for n in list(m)})),
    "outer extra member": lambda e: _zip({"manifest.json": json.dumps(e["manifest"]).encode(),
                                          "model.pt2": e["blob"], "data.pkl": e["raw"]}),
    # members replaced, renamed, deleted
    "sample inputs pickled object": lambda e: _inner(e, lambda m: m.__setitem__(SAMPLE, e["saved"])),
    "sample inputs raw pickle": lambda e: _inner(e, lambda m: m.__setitem__(SAMPLE, e["raw"])),
    "model json is a pickle": lambda e: _inner(e, lambda m: m.__setitem__(M, e["raw"])),
    "model json renamed": lambda e: _inner(e, lambda m: m.__setitem__("archive/models/other.json", m.pop(M))),
    "weight renamed": lambda e: _inner(e, lambda m: m.__setitem__("archive/data/weights/weight_00",
                                                                  m.pop("archive/data/weights/weight_0"))),
    "weight deleted": lambda e: _inner(e, lambda m: m.pop("archive/data/weights/weight_0")),
    "manifest is a list": lambda e: _zip({"manifest.json": b"[1, 2]", "model.pt2": e["blob"]}),
    "manifest version is a string": lambda e: _zip({"manifest.json": json.dumps(
        {**e["manifest"], "version": "1"}).encode(), "model.pt2": e["blob"]}),
    "manifest sha256 is a list": lambda e: _zip({"manifest.json": json.dumps(
        {**e["manifest"], "sha256": ["x"]}).encode(), "model.pt2": e["blob"]}),
    "manifest unknown field": lambda e: _zip({"manifest.json": json.dumps(
        {**e["manifest"], "loader": "pickle"}).encode(), "model.pt2": e["blob"]}),
    # payload tables edited
    "use_pickle true": lambda e: _inner(e, lambda m: (
        m.__setitem__(WCFG, m[WCFG].replace(b'"use_pickle": false', b'"use_pickle": true', 1)),
        m.__setitem__("archive/data/weights/weight_0", e["saved"]))),
    "use_pickle 0": _weights_entry(lambda x, e: x.__setitem__("use_pickle", 0)),
    "path_name custom_obj prefix": _weights_entry(lambda x, e: x.__setitem__("path_name", "custom_obj_0")),
    "path_name opaque prefix": _weights_entry(lambda x, e: x.__setitem__("path_name", "opaque_obj_0")),
    "path_name traversal": _weights_entry(lambda x, e: x.__setitem__("path_name", "../weights/weight_1")),
    "tensor bigger than its file": _weights_entry(lambda x, e: x["tensor_meta"]["sizes"][0].__setitem__(
        "as_int", 10 ** 6)),
    "huge tensor from empty file": lambda e: _inner(e, lambda m: (
        m.__setitem__("archive/data/weights/weight_0", b""),
        m.__setitem__(WCFG, m[WCFG].replace(b'{"as_int": 32}', b'{"as_int": 1000000000}', 1)))),
    "unknown dtype": _weights_entry(lambda x, e: x["tensor_meta"].__setitem__("dtype", 99)),
    "table is a list": lambda e: _inner(e, lambda m: m.__setitem__(WCFG, b"[]")),
    # the graph edited
    "sympify payload": lambda e: _json(e, M, lambda doc: _expr(e, doc)),
    "guard payload": lambda e: _json(e, M, lambda doc: doc.__setitem__("guards_code", [f"{e['py']} is None"])),
    "target imports a module": _retarget("torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch",
                                         ["{module}.Evil"]),
    "target cpp_extension": _retarget("torch.utils.cpp_extension.load_inline", ["m", "int x;"]),
    "target torch.save": _retarget("torch.save", ["x", "/tmp/x"]),
    "target os via torch": _retarget("torch.os.system", ["touch /tmp/x"]),
    "target methodcaller": _retarget("_operator.methodcaller", ["system"]),
    "target aten.save": _retarget("torch.ops.aten.save.default", ["/tmp/x"]),
    "target aten.from_file": _retarget("torch.ops.aten.from_file.default", ["/etc/passwd"]),
    "target higher order": _retarget("torch.ops.higher_order.print", ["{{0.__class__}}"]),
    "enum context imports": lambda e: _json(e, M, lambda doc: _spec(doc, "in_spec", _ENUM)),
    "defaultdict context imports": lambda e: _json(e, M, lambda doc: _spec(doc, "out_spec", _DEFAULTDICT)),
    "node name is code": _rename_value(lambda e: {"linear": f"linear; {e['py']}"}),
    "input name is code": _rename_value(lambda e: {"x": f"x=({e['py']})"}),
    "forward_arg_names is code": lambda e: _json(e, M, lambda doc: doc["graph_module"]["module_call_graph"][0][
        "signature"].__setitem__("forward_arg_names", [f"x=({e['py']})"])),
    "string graph input": lambda e: _json(e, M, lambda doc: _graph(doc)["inputs"].append(
        {"as_string": f"' + str({e['py']}) + '"})),
    "custom object value": lambda e: _json(e, M, lambda doc: _graph(doc).__setitem__(
        "custom_obj_values", {"obj": {"class_fqn": "__torch__.Evil"}})),
    "source_fn_stack": _first_node(lambda n, d, e: n["metadata"].__setitem__("source_fn_stack", "x,torch.os.system")),
    "stack trace with CR": _first_node(lambda n, d, e: n["metadata"].__setitem__("stack_trace", f"a\r{e['py']}")),
    "as_operator argument": _first_node(lambda n, d, e: n["inputs"][0].__setitem__(
        "arg", {"as_operator": "torch.os.system"})),
    "unknown top-level field": lambda e: _json(e, M, lambda doc: doc.__setitem__("pickled", "x")),
    "deeply nested json": _deep_json,
    "power tower": lambda e: _json(e, M, lambda doc: [s["as_expr"].__setitem__("expr_str", "9**9**9**9")
                                                      for v in _graph(doc)["tensor_values"].values()
                                                      for s in v["sizes"] if "as_expr" in s]),
    # zip flags, methods, layout and bombs
    "outer encryption flag": lambda e: _patch(e["outer"], "model.pt2", flags=0x1),
    "inner encryption flag": lambda e: _outer(e, _patch(_zip(e["inner"]), M, flags=0x1)),
    "outer compression 99": lambda e: _patch(e["outer"], "manifest.json", method=99),
    "inner compression 99": lambda e: _outer(e, _patch(_zip(e["inner"]), M, method=99)),
    "inner lzma": lambda e: _outer(e, _patch(_zip(e["inner"]), M, method=14)),
    "declared 512 MB stored": lambda e: _outer(e, _patch(_zip(e["inner"]), M, size=512 << 20)),
    "prepended bytes": lambda e: b"#!/bin/sh\n" + e["outer"],
    "zip comment": lambda e: e["outer"][:-2] + b"\x05\x00hello",
    "duplicate member": lambda e: _outer(e, _dup(e)),
    "real bomb as model.json": lambda e: _outer(e, _zeros_zip(e["inner"], M, 128)),
    "real bomb as extra member": lambda e: _outer(e, _zeros_zip(e["inner"], "archive/data/weights/weight_9", 128)),
    "real bomb as outer member": lambda e: _zeros_zip({"manifest.json": json.dumps(e["manifest"]).encode()},
                                                      "model.pt2", 128),
}



# ----------------------------------------------------------------------------- the checks

REMEDIES = ("fxopt.save", "upgrade fxopt", "save the model again", "re-save", "import the library")


def _clean(e) -> bool:
    return not e["marker"].exists() and ENV not in os.environ and MODULE not in sys.modules


def _load_both(e, data: bytes, name: str, must_refuse: bool) -> list[str]:
    """fxopt.load and ``fxopt inspect FILE``: each loads or raises LoadError; no payload runs."""
    path = e["tmp"] / f"{name.replace(' ', '_').replace('/', '_')}.fxopt"
    path.write_bytes(data)
    messages = []
    for how, call in (("fxopt.load", lambda: fxopt.load(path)),
                      ("fxopt inspect", lambda: cli_main(["inspect", str(path), "--debug"]))):
        try:
            call()
        except fxopt.LoadError as err:
            messages.append(str(err))
        except Exception as err:  # noqa: BLE001 - the point is to see any other type
            pytest.fail(f"{name}: {how} raised {type(err).__name__}, not LoadError: {err}")
        else:
            assert not must_refuse, f"{name}: {how} loaded a crafted file"
        assert _clean(e), f"{name}: {how} ran the payload"
    return messages


def test_payloads_are_live(env):
    """Each kind of payload runs when handed to what torch would hand it to (outside fxopt)."""
    import importlib

    import sympy

    def fired():
        ok = env["marker"].exists() and os.environ.pop(ENV, None) == "1"
        if env["marker"].exists():
            env["marker"].unlink()
        sys.modules.pop(MODULE, None)
        return ok

    pickle.loads(env["raw"])
    assert fired()
    torch.load(io.BytesIO(env["saved"]), weights_only=False)
    assert fired()
    sympy.sympify(f"({env['py']}) or Symbol('s77')")
    assert fired()
    exec(f"assert {env['py']} is None")  # what torch does with a guards_code string
    assert fired()
    importlib.import_module(MODULE)      # what a pytree context or the autograd-function target does
    assert fired()
    # torch's own loader falls back to weights_only=False for sample inputs it cannot load safely
    members = dict(env["inner"])
    members[SAMPLE] = env["saved"]
    with pytest.raises(Exception):
        torch.export.load(io.BytesIO(_zip(members)))
    assert fired()
    assert _clean(env)


def test_rebuilt_archive_still_loads(env):
    """The fuzz harness re-zips with Python's zipfile: an unchanged rebuild is accepted and exact."""
    path = env["tmp"] / "rebuilt.fxopt"
    path.write_bytes(_inner(env, lambda m: None))
    x = torch.randn(3, 16)
    assert torch.equal(fxopt.load(path)(x), env["model"](x))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file_is_refused(env, case):
    data = CRAFTED[case](env)
    tracemalloc.start()
    try:
        messages = _load_both(env, data, case, must_refuse=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{case}: {peak >> 20} MB allocated before refusing"  # nothing inflated
    for msg in messages:
        assert any(r in msg for r in REMEDIES), f"{case}: no remedy in {msg!r}"


@pytest.mark.parametrize("name", ["archive/models/model.json", WCFG, CCFG, SAMPLE, "archive/archive_format",
                                  "archive/archive_version", "archive/data/weights/weight_1"])
def test_required_member_deleted(env, name):
    _load_both(env, _inner(env, lambda m: m.pop(name)), f"deleted {name}", must_refuse=True)


_ODD_VALUES = [0, -1, 1 << 63, 1.5, float("inf"), None, True, "", "x", "s0", "__import__('os')", "a\nb", [], {},
               [{"as_int": 1}], {"as_tensor": {"name": "x"}}, "torch.ops.aten.add.Tensor", "Symbol('s0')",
               "custom_obj_0", "weight_1"]


def _flip(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    if not data or rng.random() < 0.2:
        return bytes(data[:rng.randrange(len(data) + 1)])
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _leaf_edit(rng: random.Random, doc):
    """Replace one random value anywhere in a JSON document by an odd one."""
    slots, todo = [], [doc]
    while todo:
        node = todo.pop()
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            slots.append((node, k))
            if isinstance(v, (dict, list)):
                todo.append(v)
    node, k = rng.choice(slots)
    node[k] = copy.deepcopy(rng.choice(_ODD_VALUES))


def _damaged(e, where: str, rng: random.Random) -> bytes:
    if where == "file bytes":             # zip CRCs and the checksum catch these
        return _flip(rng, e["outer"])
    if where == "member bytes":           # re-zipped with valid CRCs and checksum: the checks must catch them
        name = rng.choice(sorted(e["inner"]))
        return _inner(e, lambda m: m.__setitem__(name, _flip(rng, m[name])))
    if where == "sample pickle":
        with zipfile.ZipFile(io.BytesIO(e["inner"][SAMPLE])) as z:
            sample = {n: z.read(n) for n in z.namelist()}
        sample["archive/data.pkl"] = _flip(rng, sample["archive/data.pkl"])
        return _inner(e, lambda m: m.__setitem__(SAMPLE, _zip(sample)))
    name = rng.choice([M, M, M, WCFG])    # one JSON value replaced: reaches the schema checks and torch
    return _json(e, name, lambda doc: _leaf_edit(rng, doc))


@pytest.mark.parametrize("where,seed", [(w, s) for w, n in (("file bytes", 3), ("member bytes", 12),
                                                              ("sample pickle", 6), ("json value", 40))
                                        for s in range(n)])
def test_random_damage(env, where, seed):
    """Random damage loads (a changed weight or constant) or raises LoadError, nothing else, never runs code."""
    data = _damaged(env, where, random.Random(f"{where}{seed}"))
    _load_both(env, data, f"{where} {seed}", must_refuse=False)


def test_cli_reports_a_refusal_in_one_line(env, capsys):
    path = env["tmp"] / "cli.fxopt"
    path.write_bytes(CRAFTED["guard payload"](env))
    assert cli_main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("fxopt: error"))
    # "fxopt: error: ..." is how the CLI prints an FxoptError; anything else reads "error (TypeName)"
    assert line.startswith("fxopt: error: ") and "guard" in line and "fxopt.save" in line
    assert _clean(env)


# ----------------------------------------------------------------------------- the grammars

@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)", "Mul(Integer(384), Min(Integer(512), Symbol('s53')))",
    "Pow(Symbol('s53', positive=True, integer=True), Integer(2))", "FloorDiv(s0, 2) + Mod(s1, 8) - 1",
    "s0 * s1 // 4 + (s2 % 3) ** 2", "Rational(1, 2) * s0", "Float('0.5', precision=53)", "-u3", "Max(s0, 1)"])
def test_expression_grammar_accepts(text):
    fxopt.archive.expr_check.check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "__import__('os').system('x')", "s0.__class__", "lambda: 0", "Symbol('s0').subs", "Function('f')(s0)",
    "exec('1')", "9**9**9**9", "Pow(Integer(10), Integer(100000))", "Pow(Pow(s0, 2), 2)", "s0 ** s1 ** 2",
    "Symbol('a b')", "S.true", "[s0]", "s0; s1", "Float('nan', precision=99999)", "Integer(" + "9" * 50 + ")",
    "Symbol('s0', evaluate=False)", "LShift(1, 100000)", "x!", "s0 if s1 else s2", "'s0'"])
def test_expression_grammar_refuses(text):
    with pytest.raises(fxopt.archive.expr_check.GraphRefused):
        fxopt.archive.expr_check.check_sym_expr(text)


def test_guard_and_target_and_spec_grammars():
    g = fxopt.archive.expr_check.check_guard
    for ok in ["L['x'].size()[1] == 6", "L['attention_mask'].size()[1] == torch.sym_min(512, L['m'].size()[1])",
               "2 <= L['x'].size()[0] <= 64", "L['kw']['a'].stride()[0] % 8 == 0", "not L['n'] > 3",
               "L['m'].size()[1] == min(512, L['m'].size()[1])"]:
        g(ok)
    for bad in ["__import__('os')", "L['x'].size.__self__", "L['x'].numpy()", "torch.save(1, 'f')", "L[f'{1}']",
                "L['x'] == 'a'", "(lambda: 1)()", "L['x'].size()[0] ** 99999", "L['x'];1", "getattr(L, 'x')",
                "min.__self__", "eval('1')", "min(key=print)"]:
        with pytest.raises(fxopt.archive.expr_check.GraphRefused):
            g(bad)
    t = fxopt.archive.graph_check.check_target
    for ok in ["torch.ops.aten.__and__.Tensor", "torch.ops.fxopt.linear_int8.default", "_operator.getitem",
               "torch.sym_max", "math.floor"]:
        t(ok)
    for bad in ["torch.ops.aten.save.default", "torch.ops.aten.add.__call__", "torch.ops.aten.add.overloads",
                "torch.ops.higher_order.cond", "torch.ops.profiler._record_function_enter.default",
                "_operator.attrgetter", "torch.load", "builtins.eval", "torch.ops.aten.add"]:
        with pytest.raises(fxopt.archive.expr_check.GraphRefused):
            t(bad)
    s = fxopt.archive.graph_check.check_treespec
    s(json.dumps([1, {"type": "builtins.dict", "context": json.dumps(["a", "b"]), "children_spec": []}]))
    for bad in (_ENUM, _DEFAULTDICT, [1, {"type": "os.system", "context": None, "children_spec": []}], [2, {}]):
        with pytest.raises(fxopt.archive.expr_check.GraphRefused):
            s(json.dumps(bad))


def test_pickle_scan():
    scan = fxopt.archive.archive_check.scan_pickle
    buf = io.BytesIO()
    torch.save(((torch.ones(2), torch.arange(3)), {"m": torch.zeros(1, dtype=torch.bool)}), buf)
    with zipfile.ZipFile(buf) as z:
        scan(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    for bad in (pickle.dumps(_Payload("1"), protocol=2), pickle.dumps(_Payload("1"), protocol=4),
                pickle.dumps(((1,),), protocol=2) + b"trailing", b"\x80\x02cos\nsystem\n."):
        with pytest.raises(ValueError):
            scan(bad)


@pytest.mark.parametrize("module", [fxopt.archive.expr_check, fxopt.archive.graph_check, fxopt.archive.archive_check])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

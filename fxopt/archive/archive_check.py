"""Whitelist check of the zip archives inside a ``.fxopt`` file, before torch sees them.

``torch.export.load`` unpickles whatever its archive asks for: table entries
marked ``use_pickle``, legacy ``data/weights/<model>.pt`` files, constants named
``custom_obj_*`` / ``opaque_obj_*``, sample inputs (it retries them with
``weights_only=False``); it loads compiled libraries found under
``data/aotinductor/`` and reads every ``models/*.json``. Nothing of that is
blacklisted here; instead an archive is accepted only if it looks exactly like
what ``fxopt.save`` writes:

* zip layout: no comment or data around the archive, no duplicate or
  overlapping members, local headers that agree with the directory, no
  encryption flag, STORED or DEFLATED only, declared sizes capped (absolutely
  and by compression ratio) *before* anything is decompressed, reads bounded
  by the declared size and checked against the CRC;
* members: exactly ``archive/models/model.json``, the two payload tables, their
  ``weight_N`` / ``tensor_N`` files, ``data/sample_inputs/model.pt`` and the
  small version files, with the expected contents;
* payload tables: ``use_pickle`` exactly false, ``path_name`` a ``weight_N`` /
  ``tensor_N`` file present in the archive, tensor metadata consistent with the
  size of that file;
* sample inputs: a ``torch.save`` archive whose pickle is read with
  :mod:`pickletools` (never executed) against a whitelist of opcodes and
  globals, and then loads with ``torch.load(weights_only=True)``;
* the graph: :func:`fxopt.archive.graph_check.check_graph_json`.

Every refusal is a :class:`~fxopt.errors.LoadError` that says what was wrong and what to do.
"""
from __future__ import annotations

import io
import json
import pickletools
import re
import struct
import sys
import zipfile
import zlib
from typing import IO, Any, Callable

import torch

from fxopt.errors import LoadError
from fxopt.archive.graph_check import DTYPE_SIZES, TENSOR_DEVICES, GraphRefused, check_graph_json

__all__ = ["read_checked_zip", "read_member", "check_model_archive", "scan_pickle", "RESAVE", "DAMAGED",
           "MAX_RATIO", "MAX_TOTAL"]

RESAVE = ("fxopt refuses files that could run code when loaded; re-save the model with fxopt.save "
          "(if a newer fxopt or torch wrote this file, upgrade fxopt)")
DAMAGED = "the file is damaged or was cut short; save the model again with fxopt.save"
MAX_RATIO = 100            # declared size / compressed size, for DEFLATED members
MAX_TOTAL = 1 << 40        # sum of the declared sizes of one archive
_FLAGS_OK = 0x0002 | 0x0004 | 0x0008 | 0x0800  # deflate options, data descriptor, UTF-8 names
_MB = 1 << 20


def _refuse(where: str, what: str, remedy: str = RESAVE) -> LoadError:
    return LoadError(f"{where}: {what}; {remedy}")


class _Raw:
    """Random access to the bytes of an archive (a buffer or an open binary file)."""

    def __init__(self, src: bytes | IO[bytes]):
        self.file = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
        self.size = self.file.seek(0, io.SEEK_END)

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            return b""
        self.file.seek(offset)
        return self.file.read(n)


def _directory_end(raw: _Raw, where: str) -> tuple[int, int]:
    """(entries, directory offset) from end records that end the file exactly (no comment, no trailer)."""
    tail = raw.read(raw.size - 22, 22)
    if len(tail) != 22 or tail[:4] != b"PK\x05\x06":
        raise _refuse(where, "it is not a zip archive, or it has a comment or data after its end", DAMAGED)
    disk, cd_disk, _, entries, cd_size, cd_offset, comment = struct.unpack("<4x4H2LH", tail)
    cd_end = raw.size - 22
    loc = raw.read(raw.size - 42, 20)
    if loc[:4] == b"PK\x06\x07":  # zip64 (torch writes it for every archive): locator, then record
        rec_offset = struct.unpack("<8xQ4x", loc)[0]
        rec = raw.read(rec_offset, 56)
        if len(rec) != 56 or rec[:4] != b"PK\x06\x06" or rec_offset + 56 != raw.size - 42:
            raise _refuse(where, "its zip64 end record is malformed", DAMAGED)
        n64, cd_size64, cd_offset64 = struct.unpack("<32x3Q", rec)
        if any(small not in (big, full) for small, big, full in
               ((entries, n64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF), (cd_offset, cd_offset64, 0xFFFFFFFF))):
            raise _refuse(where, "its two end records disagree")
        entries, cd_size, cd_offset, cd_end = n64, cd_size64, cd_offset64, rec_offset
    elif entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        raise _refuse(where, "its zip64 end record is missing", DAMAGED)
    if disk or cd_disk or comment or cd_offset + cd_size != cd_end:
        raise _refuse(where, "its zip directory is not where the archive says (data added before it, "
                      "or a multi-disk archive)")
    return entries, cd_offset


def read_checked_zip(src: bytes | IO[bytes], where: str, caps: Callable[[str], int | None],
                     required: set[str], missing: str | None = None
                     ) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """Open a zip archive after checking its layout and every member's name, flags and sizes.

    ``caps(name)`` is the largest size allowed for that member, or ``None`` if
    the name is not allowed at all; ``missing`` is the message when a
    ``required`` member is absent. Returns the open archive and its members by
    name; read them with :func:`read_member`.
    """
    raw = _Raw(src)
    try:
        z = zipfile.ZipFile(raw.file)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as e:
        raise _refuse(where, f"not a zip archive (not an fxopt file?), or it is truncated or corrupted ({e})",
                      DAMAGED) from e
    entries, cd_offset = _directory_end(raw, where)
    infos = z.infolist()
    names = [i.filename for i in infos]
    if len(infos) != entries or len(set(names)) != len(names):
        raise _refuse(where, "its zip directory lists duplicate or uncounted members")
    absent = required - set(names)
    if absent:
        raise LoadError(missing) if missing else _refuse(where, f"it lacks {', '.join(sorted(absent))}",
                                                         "save the model again with fxopt.save")
    total = 0
    for info in infos:
        cap = caps(info.filename) if info.filename == info.orig_filename else None
        if cap is None:
            raise _refuse(where, f"it contains {info.filename[:200]!r}, which fxopt.save never writes")
        if info.flag_bits & ~_FLAGS_OK:
            raise _refuse(where, f"{info.filename} has zip flags {info.flag_bits:#x} (encryption or an "
                          "unknown feature)")
        if info.compress_type == zipfile.ZIP_STORED:
            ok = info.file_size == info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            ok = info.file_size <= MAX_RATIO * max(info.compress_size, 1024)
        else:
            raise _refuse(where, f"{info.filename} uses zip compression method {info.compress_type}; only "
                          "stored and deflated members are read")
        if not ok:
            raise _refuse(where, f"{info.filename} declares {info.file_size} bytes from {info.compress_size} "
                          f"compressed (more than {MAX_RATIO}x: a zip bomb?)")
        if info.file_size > cap:
            raise _refuse(where, f"{info.filename} declares {info.file_size} bytes, more than the {cap} "
                          "allowed for it")
        total += info.file_size
    if total > MAX_TOTAL:
        raise _refuse(where, f"its members declare {total} bytes in all")
    _check_local_headers(raw, infos, cd_offset, where)
    return z, {i.filename: i for i in infos}


def _check_local_headers(raw: _Raw, infos: list[zipfile.ZipInfo], cd_offset: int, where: str) -> None:
    """Every member's local header agrees with the directory, and no two members share bytes."""
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        head = raw.read(info.header_offset, 30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04" or info.header_offset < end:
            raise _refuse(where, f"{info.filename}: local header missing or overlapping another member")
        flags, method, _, _, _, _, _, n_name, n_extra = struct.unpack("<6x4H3L2H", head)
        name = raw.read(info.header_offset + 30, n_name)
        try:
            local = name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            local = None
        if flags != info.flag_bits or method != info.compress_type or local != info.orig_filename:
            raise _refuse(where, f"{info.filename}: local header disagrees with the zip directory")
        end = info.header_offset + 30 + n_name + n_extra + info.compress_size + (12 if flags & 0x8 else 0)
        if end > cd_offset:
            raise _refuse(where, f"{info.filename}: data runs into the zip directory", DAMAGED)


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    """The member's bytes, reading at most its declared size (its CRC is checked at the end)."""
    try:
        with z.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as e:
        raise _refuse(where, f"{info.filename} cannot be read ({e})", DAMAGED) from e
    if len(data) != info.file_size:
        raise _refuse(where, f"{info.filename} is not the size its zip directory declares", DAMAGED)
    return data


# ----------------------------------------------------------------------------- the model archive

_P = "archive/"
_SMALL = {"archive_format": 16, "archive_version": 16, "byteorder": 16, ".data/version": 16,
          ".data/serialization_id": 64}
_FIXED = {"models/model.json": 1 << 30, "data/weights/model_weights_config.json": 256 * _MB,
          "data/constants/model_constants_config.json": 256 * _MB, "data/sample_inputs/model.pt": 1 << 34,
          **_SMALL}
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_(0|[1-9][0-9]{0,8})\Z")
_REQUIRED = {_P + n for n in ("models/model.json", "data/weights/model_weights_config.json",
                              "data/constants/model_constants_config.json", "data/sample_inputs/model.pt",
                              "archive_format", "archive_version")}
_CONTENTS = {"archive_format": re.compile(rb"pt2\Z"), "archive_version": re.compile(rb"0\Z"),
             "byteorder": re.compile(sys.byteorder.encode() + rb"\Z"), ".data/version": re.compile(rb"\d{1,4}\n?\Z"),
             ".data/serialization_id": re.compile(rb"\d{1,64}\Z")}


def _inner_cap(name: str) -> int | None:
    if not name.startswith(_P):
        return None
    rest = name[len(_P):]
    if rest in _FIXED:
        return _FIXED[rest]
    return 1 << 38 if _PAYLOAD.match(rest) else None


def check_model_archive(blob: bytes, where: str) -> None:
    """Refuse the ``torch.export`` archive ``blob`` unless every part of it is on the whitelist."""
    label = f"{where} (model.pt2)"
    z, infos = read_checked_zip(blob, label, _inner_cap, _REQUIRED)
    data = {n: read_member(z, i, label) for n, i in infos.items() if not _PAYLOAD.match(n[len(_P):])}
    for name, pattern in _CONTENTS.items():
        value = data.get(_P + name)
        if value is not None and not pattern.match(value):
            remedy = "upgrade fxopt, or re-save the model with this torch" if name == "archive_version" else RESAVE
            raise _refuse(label, f"{name} is {value[:20]!r}, not what torch.export.save writes here", remedy)
    sizes = {n: i.file_size for n, i in infos.items()}
    used = _check_payload_table(data[_P + "data/weights/model_weights_config.json"], "weight", sizes, label)
    used |= _check_payload_table(data[_P + "data/constants/model_constants_config.json"], "tensor", sizes, label)
    orphans = [n for n in sizes if _PAYLOAD.match(n[len(_P):]) and n not in used]
    if orphans:
        raise _refuse(label, f"{orphans[0]} is not referenced by any payload table")
    _check_sample_inputs(data[_P + "data/sample_inputs/model.pt"], label)
    try:
        doc = json.loads(data[_P + "models/model.json"])
        check_graph_json(doc)
    except GraphRefused as e:
        raise _refuse(label, f"the saved graph is refused: {e}") from None
    except (ValueError, RecursionError) as e:
        raise _refuse(label, f"models/model.json is not valid JSON ({e})", DAMAGED) from e


_ENTRY_KEYS = {"path_name", "is_param", "use_pickle", "tensor_meta"}
_META_KEYS = {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"}
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")


def _ints(v: Any) -> list[int] | None:
    """``[{"as_int": 3}, ...]`` -> ``[3, ...]`` (non-negative), else None."""
    if not isinstance(v, list) or len(v) > 64:
        return None
    out = [x.get("as_int") if isinstance(x, dict) and set(x) == {"as_int"} else None for x in v]
    return out if all(type(x) is int and 0 <= x < 1 << 62 for x in out) else None  # type: ignore[misc]


def _check_payload_table(raw_json: bytes, kind: str, sizes: dict[str, int], where: str) -> set[str]:
    """Check ``model_{weights,constants}_config.json``; returns the payload members it references."""
    folder = "weights" if kind == "weight" else "constants"
    table = f"data/{folder}/model_{folder}_config.json"
    try:
        doc = json.loads(raw_json)
    except (ValueError, RecursionError) as e:
        raise _refuse(where, f"{table} is not valid JSON", DAMAGED) from e
    if not (isinstance(doc, dict) and set(doc) == {"config"} and isinstance(doc["config"], dict)):
        raise _refuse(where, f"{table} is not a payload table")
    used: set[str] = set()
    dtypes: dict[str, int] = {}
    for fqn, entry in doc["config"].items():
        what = f"{table} entry {str(fqn)[:80]!r}"
        if not (isinstance(entry, dict) and set(entry) <= _ENTRY_KEYS and {"path_name", "use_pickle"} <= set(entry)):
            raise _refuse(where, f"{what} is malformed")
        if entry["use_pickle"] is not False:
            raise _refuse(where, f"{what} is stored with pickle (use_pickle={entry['use_pickle']!r})")
        path = entry["path_name"]
        if not (isinstance(path, str) and re.fullmatch(rf"{kind}_(0|[1-9][0-9]{{0,8}})", path)):
            raise _refuse(where, f"{what} points at {str(path)[:80]!r}: only plain {kind}_N tensor files are "
                          "accepted (custom and opaque objects load through pickle)")
        if not (isinstance(fqn, str) and len(fqn) < 1024 and _FQN.match(fqn)) or \
                any(p.startswith("__") for p in fqn.split(".")) or type(entry.get("is_param", False)) is not bool:
            raise _refuse(where, f"{what} has a bad name or is_param")
        member = f"{_P}data/{folder}/{path}"
        if member not in sizes:
            raise _refuse(where, f"{what} points at {path}, which is not in the archive", DAMAGED)
        meta = entry.get("tensor_meta")
        shape = _ints(meta.get("sizes")) if isinstance(meta, dict) else None
        strides = _ints(meta.get("strides")) if isinstance(meta, dict) else None
        offset = _ints([meta.get("storage_offset")]) if isinstance(meta, dict) else None
        if not (isinstance(meta, dict) and set(meta) == _META_KEYS and shape is not None and strides is not None
                and offset is not None and len(shape) == len(strides) and type(meta["dtype"]) is int
                and meta["dtype"] in DTYPE_SIZES and type(meta["layout"]) is int and meta["layout"] == 7
                and type(meta["requires_grad"]) is bool
                and isinstance(meta["device"], dict) and set(meta["device"]) == {"type", "index"}
                and isinstance(meta["device"]["type"], str) and meta["device"]["type"] in TENSOR_DEVICES
                and (meta["device"]["index"] is None or type(meta["device"]["index"]) is int)):
            raise _refuse(where, f"{what} has malformed tensor metadata")
        if dtypes.setdefault(path, meta["dtype"]) != meta["dtype"]:
            raise _refuse(where, f"{what}: {path} is read with two dtypes")
        elem, nbytes = DTYPE_SIZES[meta["dtype"]], sizes[member]
        numel = 1
        for s in shape:
            numel *= s
        need = 0 if numel == 0 else offset[0] + sum((s - 1) * st for s, st in zip(shape, strides)) + 1
        if nbytes % elem or need * elem > nbytes:
            raise _refuse(where, f"{what} needs {need * elem} bytes but {path} holds {nbytes}", DAMAGED)
        used.add(member)
    return used


# ----------------------------------------------------------------------------- sample inputs

_PICKLE_OPS = {"PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE",
               "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND",
               "APPENDS", "LIST", "EMPTY_DICT", "SETITEM", "SETITEMS", "DICT", "BINPUT", "LONG_BINPUT",
               "MEMOIZE", "BINGET", "LONG_BINGET", "GLOBAL", "REDUCE", "BINPERSID"}
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
             "ComplexFloat", "ComplexDouble")
_PICKLE_GLOBALS = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict",
                   *(f"torch {s}Storage" for s in _STORAGES)}
_SAMPLE = {"data.pkl": 64 * _MB, "version": 16, "byteorder": 16, ".data/serialization_id": 64,
           ".format_version": 16, ".storage_alignment": 16}


def _sample_cap(name: str) -> int | None:
    rest = name[len(_P):] if name.startswith(_P) else None
    if rest is None:
        return None
    if rest in _SAMPLE:
        return _SAMPLE[rest]
    return 1 << 34 if re.fullmatch(r"data/(0|[1-9][0-9]{0,8})", rest) else None


def scan_pickle(data: bytes) -> None:
    """Raise ``ValueError`` unless the pickle uses only the opcodes and globals of plain tensors.

    The pickle is decoded by :func:`pickletools.genops`, which never executes it.

    >>> import pickle
    >>> scan_pickle(pickle.dumps(((1, 2.5), {"mask": None}), protocol=2))
    >>> scan_pickle(pickle.dumps(print, protocol=2))
    Traceback (most recent call last):
    ...
    ValueError: pickle global '__builtin__ print'
    """
    last = None
    for op, arg, pos in pickletools.genops(data):
        if op.name not in _PICKLE_OPS:
            raise ValueError(f"pickle opcode {op.name}")
        if op.name == "GLOBAL" and arg not in _PICKLE_GLOBALS:
            raise ValueError(f"pickle global {str(arg)[:80]!r}")
        last = (op.name, pos)
    if last is None or last != ("STOP", len(data) - 1):
        raise ValueError("data after the end of the pickle")


def _plain_inputs(v: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(v, (tuple, list)):
        return all(_plain_inputs(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_inputs(x, depth + 1) for k, x in v.items())
    return type(v) is torch.Tensor or v is None or type(v) in (bool, int, float, str)


def _check_sample_inputs(data: bytes, where: str) -> None:
    if not data:
        return
    label = f"{where} (sample inputs)"
    z, infos = read_checked_zip(data, label, _sample_cap, {_P + "data.pkl"})
    try:
        scan_pickle(read_member(z, infos[_P + "data.pkl"], label))
    except ValueError as e:
        raise _refuse(label, f"the pickle is not plain tensors ({e})") from e
    try:
        value = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # torch raises many types for refused or damaged pickles
        raise _refuse(label, f"they do not load with weights_only=True ({type(e).__name__})") from e
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], dict) and _plain_inputs(value)):
        raise _refuse(label, "they are not (args, kwargs) of plain tensors and numbers")

"""Model specs for the command line: where a model comes from and what it is called with.

* ``path/to/file.py:NAME``: a class (built with no arguments), a factory function, or a module
  object in that file. If the file defines ``example_inputs`` (a tuple, or a function returning
  one), that is what the model is called with; otherwise give ``--input-shape`` or ``--example``.
* ``torchvision:NAME``: a torchvision classification model, random weights (nothing is
  downloaded), called with a ``1x3x224x224`` image unless ``--input-shape`` says otherwise.
* ``hf:DIR``: a Hugging Face ``transformers`` model saved in a local directory, called with
  tokenized sentences (``input_ids``, ``attention_mask``) of ``--seq-len`` tokens.
* ``FILE.fxopt``: a model saved by ``fxopt.save``, called with the inputs it was exported with.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fxopt.errors import InputError

__all__ = ["LoadedModel", "load_model", "parse_shapes", "load_inputs_file", "SpecError"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "int64": torch.int64, "long": torch.int64,
           "int32": torch.int32, "uint8": torch.uint8}


class SpecError(InputError):
    """A MODEL argument that cannot be loaded."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    description: str = ""


def parse_shapes(text: str, dtype: str = "float32") -> tuple:
    """``"1x3x224x224"`` or ``"2x16,2x16"`` -> random tensors of those shapes (``fxopt --input-shape``)."""
    if dtype not in _DTYPES:
        raise SpecError(f"unknown dtype '{dtype}'; use one of {', '.join(sorted(_DTYPES))}")
    out = []
    g = torch.Generator().manual_seed(0)
    for part in text.split(","):
        try:
            dims = [int(d) for d in part.strip().lower().split("x")]
        except ValueError:
            raise SpecError(f"bad --input-shape '{part}': write sizes joined by x, e.g. 1x3x224x224, and "
                            "separate several inputs with commas") from None
        if not dims or any(d <= 0 for d in dims):
            raise SpecError(f"bad --input-shape '{part}': every size must be a positive integer")
        dt = _DTYPES[dtype]
        t = torch.randn(dims, generator=g).to(dt) if dt.is_floating_point else torch.randint(0, 100, dims, generator=g, dtype=dt)
        out.append(t)
    return tuple(out)


def load_inputs_file(path: str) -> tuple[tuple, dict]:
    """Inputs saved with ``torch.save``: a tensor, a tuple/list (positional), a dict (keyword), or
    ``{"args": (...), "kwargs": {...}}``. Loaded with ``weights_only=True`` (no code runs)."""
    if not os.path.exists(path):
        raise SpecError(f"no such file: {path}")
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:
        raise SpecError(f"cannot read {path} as tensors saved with torch.save ({type(e).__name__}: {e})") from e
    if isinstance(obj, torch.Tensor):
        return (obj,), {}
    if isinstance(obj, dict) and set(obj) <= {"args", "kwargs"} and obj:
        return tuple(obj.get("args", ())), dict(obj.get("kwargs", {}))
    if isinstance(obj, dict):
        return (), obj
    if isinstance(obj, (tuple, list)):
        return tuple(obj), {}
    raise SpecError(f"{path} holds a {type(obj).__name__}; save a tensor, a tuple of tensors or a dict of them")


def _from_file(spec: str) -> tuple[torch.nn.Module, Any, str]:
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SpecError(f"'{spec}': write a file model as path/to/file.py:NAME")
    if not os.path.exists(path):
        raise SpecError(f"no such file: {path}")
    mod_name = f"fxopt_user_{os.path.splitext(os.path.basename(path))[0]}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, name):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=3)
        raise SpecError(f"{path} has no '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    obj = getattr(module, name)
    if isinstance(obj, torch.nn.Module):
        model = obj
    else:
        try:
            model = obj()
        except TypeError as e:
            raise SpecError(f"{path}:{name} must be a Module, a class or a function that builds one with no "
                            f"arguments ({e})") from e
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{path}:{name} gave a {type(model).__name__}, not a torch.nn.Module")
    example = getattr(module, "example_inputs", None)
    if callable(example):
        example = example()
    return model, example, f"{name} from {path}"


def _torchvision(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        raise SpecError("torchvision: models need torchvision (pip install 'fxopt[models]')") from None
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise SpecError(f"torchvision has no classification model '{name}'" +
                        (f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"))
    return torchvision.models.get_model(name, weights=None)


_SENTENCES = ["fxopt compiles models and shows what it did.", "The weather was cold, so we stayed inside.",
              "A short one.", "Transformers read text as tokens, one vector per token."]


def _huggingface(path: str, batch: int, seq_len: int) -> tuple[torch.nn.Module, dict]:
    if not os.path.isdir(path):
        raise SpecError(f"hf:{path}: not a directory; give a local transformers model directory "
                        "(nothing is downloaded)")
    try:
        import transformers
    except ImportError:
        raise SpecError("hf: models need transformers (pip install 'fxopt[models]')") from None
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise SpecError(f"hf:{path}: transformers could not load a model from it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})") from e
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        sents = [_SENTENCES[i % len(_SENTENCES)] for i in range(batch)]
        enc = tok(sents, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    except Exception:  # no tokenizer: random token ids
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, kwargs


def load_model(spec: str, input_shape: str | None = None, example: str | None = None, batch: int = 1,
               seq_len: int = 128, dtype: str = "float32") -> LoadedModel:
    """Load a model and its example inputs from a MODEL spec (see the module docstring)."""
    given: tuple[tuple, dict] | None = None
    if input_shape and example:
        raise SpecError("give --input-shape or --example, not both")
    if input_shape:
        given = (parse_shapes(input_shape, dtype), {})
    elif example:
        given = load_inputs_file(example)
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1])
        args = given or ((torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)),), {})
        return LoadedModel(model.eval(), args[0], args[1], f"torchvision {spec.split(':', 1)[1]} (random weights)")
    if spec.startswith("hf:"):
        model, kwargs = _huggingface(spec[3:], batch, seq_len)
        args = given or ((), kwargs)
        return LoadedModel(model.eval(), args[0], args[1], f"transformers model from {spec[3:]}")
    if spec.endswith(".fxopt"):
        from fxopt.archive.serialize import load
        gm = load(spec)
        from fxopt.runtime.engines import RuntimeModule
        if isinstance(gm, RuntimeModule):  # the commands inspect, recompile and export fxopt's graph
            gm = gm.graph_module
        ex = gm.meta.get("fxopt_example_inputs")
        if given is None and ex is None:
            raise SpecError(f"{spec} carries no example inputs; give --input-shape or --example")
        args = given or ex
        return LoadedModel(gm, tuple(args[0]), dict(args[1]), f"fxopt model {spec}")
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        model, ex, desc = _from_file(spec)
        if given is None:
            if ex is None:
                raise SpecError(f"{spec}: the file defines no example_inputs; give --input-shape 1x3x224x224 "
                                "or --example inputs.pt")
            given = ((ex,), {}) if isinstance(ex, torch.Tensor) else \
                ((), dict(ex)) if isinstance(ex, dict) else (tuple(ex), {})
        return LoadedModel(model.eval(), given[0], given[1], desc)
    raise SpecError(f"cannot understand MODEL '{spec}': use path/to/file.py:NAME, torchvision:NAME, "
                    "hf:LOCAL_DIR or a .fxopt file")

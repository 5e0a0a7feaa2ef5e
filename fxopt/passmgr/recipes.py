"""Recipes: named pipelines with a one-line doc. ``fxopt.recipes`` lists them.

    >>> import fxopt
    >>> "default" in fxopt.recipes
    True
    >>> fxopt.recipes["cleanup"].pipeline
    'cleanup'
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

from fxopt.errors import RecipeError

__all__ = ["Recipe", "RecipeRegistry", "recipes", "register_recipe", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    pipeline: str
    doc: str

    def __str__(self) -> str:
        return f"{self.name:<14} {self.doc}  [{self.pipeline}]"


class RecipeRegistry(Mapping):
    """A read-only mapping name -> Recipe whose repr is a table; extend with :func:`register_recipe`."""

    def __init__(self) -> None:
        self._items: dict[str, Recipe] = {}

    @property
    def _all(self) -> dict[str, Recipe]:
        import fxopt
        fxopt._load()  # the built-in recipes register when the library loads
        return self._items

    def __getitem__(self, name: str) -> Recipe:
        if name not in self._all:
            raise RecipeError(f"unknown recipe '{name}'. Known recipes: {', '.join(sorted(self._items))}. "
                              "A pipeline string such as 'cleanup,cse' works too "
                              "(`fxopt recipes` lists recipes with their docs)")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._all

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._all))

    def __len__(self) -> int:
        return len(self._all)

    def __repr__(self) -> str:
        return "\n".join(str(self._all[k]) for k in self)


recipes = RecipeRegistry()


def register_recipe(name: str, pipeline: str, doc: str, *, replace: bool = False) -> Recipe:
    from fxopt.passmgr.pipeline import parse_pipeline
    if name in recipes._items and not replace:
        raise RecipeError(f"recipe '{name}' already exists; pass replace=True to redefine it")
    parse_pipeline(pipeline)
    recipes._items[name] = Recipe(name, pipeline, doc)
    # a recipe is also a pipeline step ("default,magnitude-prune"), unless a pass owns the name
    from fxopt.passmgr.pass_base import ALIAS_REGISTRY, PASS_REGISTRY
    from fxopt.passmgr.pipeline import register_pipeline
    if name not in PASS_REGISTRY and (name not in ALIAS_REGISTRY or ALIAS_REGISTRY[name].from_recipe):
        register_pipeline(name, pipeline, doc.split(";")[0], from_recipe=True)
    return recipes._items[name]


def get_recipe(name: str) -> Recipe:
    return recipes[name]


def _builtin() -> None:
    register_recipe("default", "canonicalize,fold-bn,fuse-attention,simplify-activations,cleanup",
                    "The semantics-preserving rewrites and cleanup: linear canonicalization, batch-norm "
                    "folding, attention fusion, canonical activations, then exact cleanup.", replace=True)
    register_recipe("sparse-2:4", "canonicalize,fold-bn,sparsify-2:4,cleanup",
                    "2:4 semi-structured weight sparsity on convs and linears (output layer kept dense); "
                    "fine-tune afterwards with fxopt.finetune, which keeps the zeros.", replace=True)
    register_recipe("prune-50", "canonicalize,prune(ratio=0.5),cleanup",
                    "Structured pruning: remove 50% of the channels of every prunable channel group "
                    "(the model really shrinks); batch norms stay so fxopt.finetune can re-estimate them "
                    "(compile with 'fold-bn' after fine-tuning).", replace=True)
    register_recipe("int8", "canonicalize,fold-bn,smooth-quant,insert-qdq(embedding=int8/channel),lower-quant,"
                    "cleanup",
                    "Static W8A8: int8 per-channel weights, uint8 per-tensor activations calibrated on "
                    "`calibration=` data, fbgemm int8 linear/conv kernels; int8 embeddings. Needs calibration data.",
                    replace=True)
    register_recipe("int8-dynamic", "canonicalize,fold-bn,smooth-quant(default=0.5),insert-qdq(activation=int8/token,"
                    "embedding=int8/channel),lower-quant,cleanup",
                    "Dynamic W8A8: int8 per-channel weights, int8 per-token activations scaled at run time "
                    "(no calibration), fbgemm int8 linears; int8 embeddings; SmoothQuant with alpha 0.5 "
                    "(smoothquant=ALPHA|False; calibration= data, else the example inputs, give its ranges).",
                    replace=True)
    register_recipe("int8-weight", "canonicalize,fold-bn,insert-qdq(activation=none,embedding=int8/channel),"
                    "lower-quant,cleanup",
                    "Weight-only int8 (per channel) for linears, convs and embeddings: 4x smaller weights, "
                    "fp32 math; no calibration.", replace=True)
    register_recipe("int4-weight", "canonicalize,fold-bn,insert-qdq(weight=int4/group128/asym/gptq,"
                    "activation=none,embedding=int4/group128/asym/mse),lower-quant,cleanup",
                    "Weight-only int4, group-wise affine scales chosen by MSE search (group_size=N option, default "
                    "128; convs per channel), two weights per byte: ~7x smaller weights, fp32 math. Linear weights "
                    "are rounded by GPTQ when calibration= data has >= 4 rows per input feature (else, and with no "
                    "calibration, round-to-nearest).", replace=True)
    register_recipe("bf16", "canonicalize,fold-bn,fuse-attention,cast(dtype=bf16),cleanup",
                    "bfloat16 compute and weights with float32 islands (softmax, norms, reductions, losses); "
                    "inputs and outputs keep their dtypes. keep=[...] in cast() adds islands.", replace=True)
    register_recipe("fp16", "canonicalize,fold-bn,fuse-attention,cast(dtype=fp16),cleanup",
                    "float16 compute and weights with float32 islands, like bf16 (fp16 matmuls are slow on "
                    "CPUs without native fp16 GEMMs; meant for GPUs).", replace=True)
    register_recipe("cleanup", "cleanup", "Same as default: the exact cleanup passes to a fixed point.",
                    replace=True)

"""What ``insert-qdq`` decided for a layer, as a typed object in the layer's node metadata.

``insert-qdq`` writes one :class:`QuantAnnotation` per quantized linear, conv or embedding
(PT2E's quantization specs play the same part): the weight's :class:`~fxopt.quant.qspec.QSpec`,
the activation's (``None``: weight-only), and the CPU plan the int8 code widths were fitted to.
``lower-quant`` reads its typed fields (code width, symmetry, group size); nothing parses text
back.

The node carries it under three keys of :mod:`fxopt.ir.dialect`:

* ``QUANT_ANNOTATION_META``: the object itself, what passes read;
* ``QUANT_META``: its text form, ``{"weight": "int8/channel", "activation": "uint8/tensor"}``
  (plus ``"isa"`` for int8-kernel layers), for display and history;
* ``CUSTOM_META`` (torch's ``custom`` dict) under ``"fxopt_quant"``: the same text form, the one
  node metadata ``torch.export`` keeps, so ``fxopt.save``/``fxopt.load`` round-trip it as JSON.

:meth:`QuantAnnotation.of` finds it under any of them: the object when a pass of this process
wrote it, else the text of a loaded or older graph (the only place the text is parsed)::

    >>> from fxopt.quant.annotation import QuantAnnotation
    >>> from fxopt.quant.qspec import QSpec
    >>> a = QuantAnnotation(QSpec.parse("int4/group64"))
    >>> a.bits, a.group_size, a.symmetric, a.weight_only
    (4, 64, True, True)
    >>> a.to_dict()
    {'weight': 'int4/group64', 'activation': None}
    >>> QuantAnnotation.from_dict({"weight": "int8/channel/asym", "activation": "int8/token"}).dynamic
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.dialect import CUSTOM_META, QUANT_ANNOTATION_META, QUANT_META
from fxopt.quant.qspec import QSpec

__all__ = ["QuantAnnotation"]


@dataclass(frozen=True)
class QuantAnnotation:
    """One layer's quantization: ``weight`` and ``activation`` specs, ``isa`` of the int8 plan."""

    weight: QSpec
    activation: QSpec | None = None
    #: the CPU whose int8 kernels the code widths were fitted to ("avx2", "avx512-vnni (forced)"); None
    #: where no int8 kernel runs the layer
    isa: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QSpec) or not isinstance(self.activation, (QSpec, type(None))):
            raise TypeError(f"QuantAnnotation takes QSpec objects (QSpec.parse('int8/channel')), got "
                            f"weight={self.weight!r}, activation={self.activation!r}")
        if self.isa is not None and not isinstance(self.isa, str):
            raise TypeError(f"QuantAnnotation.isa is a string, got {self.isa!r}")

    # -- what the kernels need -------------------------------------------
    @property
    def bits(self) -> int:
        """The weight's code width."""
        return self.weight.bits

    @property
    def group_size(self) -> int:
        """Consecutive weights sharing one scale, 0 for per-tensor or per-channel scales."""
        return self.weight.group_size if self.weight.granularity == "group" else 0

    @property
    def symmetric(self) -> bool:
        """Signed symmetric weights: every zero point is 0, the form the int8 x int8 kernels take."""
        return self.weight.signed and self.weight.symmetric

    @property
    def dynamic(self) -> bool:
        """Activations quantized at run time (per token)."""
        return self.activation is not None and self.activation.dynamic

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    # -- text form ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The text form (JSON data): ``{"weight": ..., "activation": ...}`` and ``"isa"`` when set."""
        out: dict[str, Any] = {"weight": str(self.weight),
                               "activation": str(self.activation) if self.activation is not None else None}
        if self.isa is not None:
            out["isa"] = self.isa
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "QuantAnnotation":
        """Rebuild from :meth:`to_dict`'s form (a loaded graph's, or one written before the typed key)."""
        if not isinstance(data, dict) or not isinstance(data.get("weight"), (str, QSpec)):
            raise ValueError(f"a quantization annotation is {{'weight': SPEC, 'activation': SPEC or None}}, "
                             f"got {data!r:.120}")
        act = data.get("activation")
        isa = data.get("isa")
        return cls(QSpec.parse(data["weight"]), QSpec.parse(act) if act is not None else None,
                   str(isa) if isa is not None else None)

    # -- node metadata -----------------------------------------------------
    def write(self, node: fx.Node) -> None:
        """Annotate ``node`` (all three keys; see the module docs)."""
        text = self.to_dict()
        node.meta[QUANT_ANNOTATION_META] = self
        node.meta[QUANT_META] = text
        # a fresh dict: torch may share one `custom` dict between nodes it annotated together
        node.meta[CUSTOM_META] = {**(node.meta.get(CUSTOM_META) or {}), QUANT_META: dict(text)}

    @classmethod
    def of(cls, node: fx.Node) -> "QuantAnnotation | None":
        """``node``'s annotation: the typed one, else rebuilt from the text a loaded or older graph has."""
        ann = node.meta.get(QUANT_ANNOTATION_META)
        if isinstance(ann, cls):
            return ann
        for text in (node.meta.get(QUANT_META), (node.meta.get(CUSTOM_META) or {}).get(QUANT_META)):
            if text:
                try:
                    return cls.from_dict(text)
                except (ValueError, TypeError) as e:  # (PipelineError is a ValueError: a bad spec)
                    raise ValueError(f"node '{node.name}': unreadable quantization annotation {text!r:.120} "
                                     f"({e}); quantize the model again with insert-qdq") from e
        return None

    @classmethod
    def carry(cls, dst: fx.Node, src: fx.Node) -> None:
        """Carry ``src``'s annotation over to ``dst`` (a kernel replacing a layer)."""
        ann = cls.of(src)
        if ann is not None:
            ann.write(dst)

    @classmethod
    def inferred(cls, zero_point: torch.Tensor, group_size: int) -> "QuantAnnotation":
        """What an unannotated stored weight most likely is (a graph saved before annotations were kept
        through ``fxopt.save``): 8-bit codes, symmetric where every zero point is 0."""
        sym = bool((zero_point == 0).all())
        gran = {"granularity": "group", "group_size": group_size} if group_size else {"granularity": "channel"}
        return cls(QSpec(bits=8, signed=True, symmetric=sym, **gran))

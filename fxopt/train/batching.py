"""Token batches regrouped by length: the same sentences, a fraction of the padding.

A list of Hugging Face style batches (dicts of ``[batch, seq]`` tensors with an ``attention_mask``)
padded to a common length spends most of a transformer's training time on padding: the
sentence corpus of ``bench/recover.py``, batched in the order it comes, is 50% padding at
length 64. :func:`rebatch_by_length` takes every sentence out of its batch with its real tokens
only, sorts the sentences by length, cuts them into batches of the original sizes, pads each batch
to its own longest sentence, and shuffles the batch order with a fixed seed:

    >>> import torch
    >>> from fxopt.train.batching import rebatch_by_length
    >>> b = {"input_ids": torch.tensor([[101, 7, 102, 0], [101, 7, 8, 102]]),
    ...      "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    >>> out, info = rebatch_by_length([b, b], batch_size=2)
    >>> [tuple(x["input_ids"].shape) for x in out], info["padding_before"], info["padding_after"]
    ([(2, 3), (2, 4)], 0.125, 0.0)

The regrouped batches compute what the originals did, sentence by sentence: only right padding
(each row's real tokens first, then padding) is regrouped, since there the real tokens keep their
positions whatever the padding; the padding value of every key is the one its batches used.
Anything else (labels beside the inputs, left padding, masks with holes, tensors of another shape,
a DataLoader) is returned unchanged, with the reason (:func:`fxopt.compile`'s ``recover=`` records it).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch

from fxopt.quant.calibrate import token_mask

__all__ = ["rebatch_by_length", "padding_fraction"]


def padding_fraction(data: Any) -> float | None:
    """The fraction of token positions that are padding in a list of token batches, or None."""
    real = total = 0
    for b in data:
        am = b.get("attention_mask") if isinstance(b, dict) else None
        if not isinstance(am, torch.Tensor) or am.dim() != 2:
            return None
        real += int((am != 0).sum())
        total += am.numel()
    return None if total == 0 else 1.0 - real / total


def _why_not(data: Any) -> str | None:
    """Why ``data`` cannot be regrouped (None when it can)."""
    if not isinstance(data, (list, tuple)):
        return "not a list of batches (a DataLoader or another iterable is read as it comes)"
    if not data:
        return "no batches"
    for b in data:
        if not isinstance(b, dict):
            return "the batches are not dicts of keyword inputs (labels beside the inputs, or positional inputs)"
        keep = token_mask(b)
        if keep is None:
            return "a batch has no 2-D attention_mask of zeros and ones"
        if any(not isinstance(v, torch.Tensor) or v.shape != keep.shape for v in b.values()):
            return "a batch holds a value that is not a [batch, seq] tensor like its attention_mask"
        n = keep.sum(1)
        if bool((n == 0).any()):
            return "a batch has a row without real tokens"
        # right padding: the real tokens of every row come first
        if not bool(torch.equal(keep, torch.arange(keep.shape[1], device=keep.device).unsqueeze(0) < n.unsqueeze(1))):
            return "not right-padded (left padding, or masks with holes, would move real tokens)"
    keys = [tuple(sorted(b)) for b in data]
    if len(set(keys)) > 1:
        return "the batches do not all have the same keys"
    return None


def _pad_values(data: list[dict]) -> dict[str, Any] | str:
    """The value each key holds at padding positions (one per key), or why there is none."""
    pads: dict[str, Any] = {}
    for b in data:
        pad = b["attention_mask"] == 0
        if not bool(pad.any()):
            continue
        for k, v in b.items():
            vals = torch.unique(v[pad])
            if vals.numel() != 1:
                return f"'{k}' holds different values at padding positions"
            val = vals.item()
            if pads.setdefault(k, val) != val:
                return f"'{k}' is padded with different values in different batches"
    return pads


def rebatch_by_length(data: Any, batch_size: int | None = None, seed: int = 0) -> tuple[Any, dict]:
    """``(batches, info)``: ``data``'s sentences regrouped by length (see the module docstring).

    ``batch_size``: sentences per batch (default: the sizes of ``data``'s own batches, so that no batch
    size appears that the data did not have; ``info["batch_size"]`` is the most common one).
    ``info``: ``rebatched`` (bool), ``why`` (when not), ``batches``, ``sentences``,
    ``padding_before`` / ``padding_after`` (fractions of positions)."""
    why = _why_not(data)
    before = padding_fraction(data) if why is None else None
    if why is None and before == 0.0:
        why = "no padding to remove"
    pads = _pad_values(list(data)) if why is None else None
    if isinstance(pads, str):
        why = pads
    if why is not None:
        return data, {"rebatched": False, "why": why}
    if batch_size is None:   # the batches' own sizes, in their order: no batch size the data did not have
        sizes = [int(b["attention_mask"].shape[0]) for b in data]
        batch_size = Counter(sizes).most_common(1)[0][0]
    elif batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    else:
        total = sum(int(b["attention_mask"].shape[0]) for b in data)
        sizes = [batch_size] * (total // batch_size) + ([total % batch_size] if total % batch_size else [])
    rows = []   # (length, order, {key: 1-D tensor of the real tokens})
    for b in data:
        lengths = (b["attention_mask"] != 0).sum(1).tolist()
        for i, n in enumerate(lengths):
            rows.append((n, len(rows), {k: v[i, :n] for k, v in b.items()}))
    rows.sort(key=lambda r: (r[0], r[1]))
    # no batch narrower than 2 unless the data had one: a captured graph's symbolic sizes start at 2
    floor = min(2, min(int(b["attention_mask"].shape[1]) for b in data))
    out, start = [], 0
    for size in sizes:
        group, start = rows[start:start + size], start + size
        width = max(floor, max(r[0] for r in group))
        batch = {}
        for k, like in data[0].items():
            t = torch.full((len(group), width), pads.get(k, 0), dtype=like.dtype, device=like.device)
            for j, (n, _, vals) in enumerate(group):
                t[j, :n] = vals[k]
            batch[k] = t
        out.append(batch)
    random.Random(seed).shuffle(out)
    return out, {"rebatched": True, "batches": len(out), "sentences": len(rows), "batch_size": batch_size,
                 "padding_before": round(before, 4), "padding_after": round(padding_fraction(out) or 0.0, 4)}

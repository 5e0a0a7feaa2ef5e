"""The training stages of ``fxopt.qat`` and ``compile(recover=...)`` as a table (history and report)."""
from __future__ import annotations

from typing import Any

__all__ = ["describe_stages"]


def _count(v: Any) -> str:
    from fxopt.viz.summarize import fmt_count
    return "-" if v is None else fmt_count(int(v))


def describe_stages(stages: list) -> str:
    """One row per stage: what ran, the metric after it, parameters, bytes, epochs, final loss, seconds."""
    head = ["stage", "what", "metric", "params", "bytes", "epochs", "final loss", "seconds"]
    rows = []
    for st in stages:
        epochs = st.get("epochs") or []
        metric = st.get("metric")
        rows.append([st.get("stage", "?"), str(st.get("what", ""))[:48],
                     "-" if metric is None else f"{metric:.4g}", _count(st.get("params")), _count(st.get("bytes")),
                     str(len(epochs)) if epochs else "-",
                     f"{epochs[-1]['loss']:.4g}" if epochs and "loss" in epochs[-1] else "-",
                     f"{st.get('seconds', 0.0):.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(r: list) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    notes = []
    for st in stages:   # the recovery call pruned two ways and kept the one closer to the original
        p = st.get("pruning")
        if p:
            errs = ", ".join(f"{k} {v:.4g}" for k, v in p.get("output_error", {}).items())
            notes.append(f"{st.get('stage', '?')}: pruned by {p.get('chosen')} (relative output error on the "
                         f"recovery data: {errs})")
        b = st.get("batching")
        if b and b.get("rebatched"):   # token batches regrouped by length
            notes.append(f"{st.get('stage', '?')}: {b['sentences']} sentences regrouped by length into {b['batches']} "
                         f"batches of {b['batch_size']} (padding {b['padding_before']:.0%} -> {b['padding_after']:.0%})")
        if st.get("optimizer"):
            notes.append(f"{st.get('stage', '?')}: optimizer {st['optimizer']}")
    return "training stages:\n" + "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
                                             + notes)

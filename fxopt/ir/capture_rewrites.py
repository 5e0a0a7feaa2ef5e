"""Export-friendly equivalents used while capturing (a ``TorchFunctionMode``).

Some library code is correct eagerly but makes ``torch.export`` specialize the batch
size, so a graph captured at batch 2 rejects batch 1 (or the reverse):

* ``nn.MultiheadAttention`` with ``batch_first=True`` transposes its inputs to
  sequence-first and runs ``linear`` on the transposed view; the matmul's stride checks
  add a ``batch != 1`` guard (torchvision's ViT). :func:`multi_head_attention` computes
  the same attention batch-first: separate Q/K/V projections of the contiguous input,
  heads by ``view``/``transpose``, ``scaled_dot_product_attention`` (or an explicit
  softmax when the weights are asked for), then the output projection. Its heads are
  the pattern the ``prune`` pass prunes whole.
* ``adaptive_avg_pool2d(x, 1)`` on a permuted (channels-last-strided) tensor picks an
  output memory format by its strides, which adds a ``batch > 1`` guard (torchvision's
  Swin). There, a mean over the spatial dims is the same value; contiguous inputs keep
  the pooling op.
* A convolution of a permuted tensor (ConvNeXt's depthwise conv after its channels-last
  MLP) picks its output layout by strides the same way: the input is made contiguous
  first (same values; a model fed channels-last inputs on purpose therefore gets
  NCHW convs plus one copy each, which can be slower).

Only calls these rewrites fully support are changed (anything else runs the original);
the results match the originals up to float rounding (``tests/core/test_capture.py``).

After capture, :func:`stride_safe_views` fixes what export cannot see: the strides of a
kernel's output. ``scaled_dot_product_attention`` returns a ``[B, H, S, D]`` tensor laid
out as ``[B, S, H, D]`` from the fused CPU kernel (no grad) and contiguous from the math
kernel (grad enabled, some masks). Export traces one of them, so a
``transpose(1, 2).view(B, S, H * D)`` (or a ``.contiguous()`` that was a no-op on the
traced strides and vanished) only works for that kernel: T5 called with grad enabled, or
re-exported by ``fxopt.save``, failed with "view size is not compatible". Every ``view``
reached from an attention output through layout ops becomes a ``reshape``: a view where
the strides allow it (no copy), a copy where they do not.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ExportFriendly", "multi_head_attention", "stride_safe_views"]

_POOLS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_CONVS = {F.conv1d, F.conv2d, F.conv3d}


def _float_mask(mask: Any, dtype: torch.dtype) -> Any:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, embed_dim_to_check: int,
                         num_heads: int, in_proj_weight: Any, in_proj_bias: Any, bias_k: Any, bias_v: Any,
                         add_zero_attn: bool, dropout_p: float, out_proj_weight: torch.Tensor, out_proj_bias: Any,
                         training: bool = True, key_padding_mask: Any = None, need_weights: bool = True,
                         attn_mask: Any = None, use_separate_proj_weight: bool = False, q_proj_weight: Any = None,
                         k_proj_weight: Any = None, v_proj_weight: Any = None, static_k: Any = None,
                         static_v: Any = None, average_attn_weights: bool = True, is_causal: bool = False) -> Any:
    """``F.multi_head_attention_forward`` computed batch-first (same arguments, same results).

    Returns ``NotImplemented`` for what it does not cover (unbatched inputs, ``bias_k``/``bias_v``,
    ``add_zero_attn``, static keys); the caller then runs the original.
    """
    if query.dim() != 3 or bias_k is not None or bias_v is not None or add_zero_attn or \
            static_k is not None or static_v is not None or embed_dim_to_check != query.shape[-1]:
        return NotImplemented
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                           "module method `generate_square_subsequent_mask` to create this mask.")
    q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))   # [B, L, E]: contiguous again
    bsz, tgt, embed = q_in.shape
    src = k_in.shape[1]
    head_dim = embed // num_heads
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(x: torch.Tensor, w: torch.Tensor, b: Any, n: int) -> torch.Tensor:
        return F.linear(x, w, b).view(bsz, n, num_heads, head_dim).transpose(1, 2)
    q, k, v = heads(q_in, wq, bq, tgt), heads(k_in, wk, bk, src), heads(v_in, wv, bv, src)
    causal = bool(is_causal) and key_padding_mask is None and not need_weights
    mask = None
    if not causal:
        am = _float_mask(attn_mask, q.dtype)
        if am is not None:
            mask = am.view(1, 1, tgt, src) if am.dim() == 2 else am.view(bsz, num_heads, tgt, src)
        kpm = _float_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0
    weights = None
    if need_weights:
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        attn = F.dropout(attn, p) if p > 0 else attn
        weights = attn.mean(dim=1) if average_attn_weights else attn
        out = torch.matmul(attn, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    out = F.linear(out.transpose(1, 2).reshape(bsz, tgt, embed), out_proj_weight, out_proj_bias)
    return out.transpose(0, 1), weights


class ExportFriendly(TorchFunctionMode):
    """Active while fxopt captures a model: routes the calls above to their equivalents."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            out = multi_head_attention(*args, **kwargs)
            if out is not NotImplemented:
                return out
        elif func in _CONVS and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3 and \
                isinstance(args[0].stride(-1), int) and args[0].stride(-1) != 1:
            return func(args[0].contiguous(), *args[1:], **kwargs)
        elif func in _POOLS and args:
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            n = _POOLS[func]
            x = args[0]
            if (size == 1 or (isinstance(size, (tuple, list)) and list(size) == [1] * n)) and \
                    isinstance(x, torch.Tensor) and x.dim() >= n + 1 and isinstance(x.stride(-1), int) and \
                    x.stride(-1) != 1:   # only permuted inputs: contiguous ones export fine
                return x.mean(dim=tuple(range(-n, 0)), keepdim=True)
        return func(*args, **kwargs)


_aten = torch.ops.aten
#: ops whose output strides the kernel chooses at run time
_LAYOUT_SOURCES = {_aten.scaled_dot_product_attention.default}
#: ops that keep their input's memory layout (so a view after them depends on it)
_KEEP_LAYOUT = {_aten.transpose.int, _aten.permute.default, _aten.view.default, _aten.reshape.default,
                _aten._unsafe_view.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
                _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.alias.default, _aten.t.default}


def stride_safe_views(gm: fx.GraphModule) -> int:
    """Turn every ``view`` of an attention output (through layout-keeping ops) into a
    ``reshape``; returns how many. See the module docs."""
    done, seen = 0, set()
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYOUT_SOURCES]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or user.op != "call_function" or user.target not in _KEEP_LAYOUT or \
                    user.args[0] is not node:
                continue
            seen.add(user)
            if user.target is _aten.view.default:
                user.target = _aten.reshape.default
                done += 1
            todo.append(user)
    if done:
        gm.recompile()
    return done

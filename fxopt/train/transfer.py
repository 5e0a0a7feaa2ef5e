"""``fxopt.transfer``: reuse a trained network for a new task: a new output layer, a frozen backbone,
discriminative learning rates.

    >>> import torch, fxopt
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> model, hist = fxopt.transfer(backbone, data, num_outputs=3, epochs=2, progress=False)
    >>> model(x[:2]).shape, hist.head
    (torch.Size([2, 3]), '2')

The output layer (``head=``: a module path, or for a compiled graph the weight's attribute; default:
the last linear layer on the way to the output) is replaced by a fresh ``Linear(in, num_outputs)``
(seeded). ``freeze="backbone"`` (default) trains only the new head for the first ``unfreeze_after``
epochs (default: all of them); after that every layer trains, the backbone at ``backbone_lr`` times
the head's learning rate (discriminative rates, default 0.1). ``freeze=[globs]`` freezes the
parameters whose names match for the whole run instead. Works on plain modules and on compiled (pruned,
quantized-then-trained) graphs; the model passed in is never changed.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Iterable

import torch
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.ir.torch_compat import torch_internals
from fxopt.train.qat import getattr_path

__all__ = ["transfer"]

_LINEAR = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)


def _last_linear_run(model: torch.nn.Module, inputs: Any) -> str | None:
    """The module path of the last ``nn.Linear`` that runs in a forward pass (execution order, not the
    order the layers were registered in)."""
    from fxopt.train.training import _call
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            _call(model.eval(), inputs)
    except Exception:
        return None  # the caller's own check reports a model that does not run
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def _module_head(model: torch.nn.Module, head: str | None, inputs: Any = None) -> tuple[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise InputError(f"the model has no module '{head}'; heads are module paths such as "
                             f"{', '.join(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))}")
        if not isinstance(modules[head], torch.nn.Linear):
            raise InputError(f"head '{head}' is a {type(modules[head]).__name__}; fxopt.transfer replaces a Linear")
        return head, modules[head]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise InputError("the model has no nn.Linear to replace; pass head= (a module path)")
    last = _last_linear_run(model, inputs) if inputs is not None else None
    return (last, modules[last]) if last is not None else linears[-1]


def _graph_head(gm: fx.GraphModule, head: str | None) -> tuple[str, str | None]:
    """(weight attribute, bias attribute) of the linear that produces the graph's output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    linears = []
    seen, todo = set(), list(out.all_input_nodes)
    while todo:  # breadth-first from the output: the first linear met is the output layer
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default \
                and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr":
            linears.append(n)
            if head is None:
                break
        todo += n.all_input_nodes
    if head is not None:
        linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
                   and isinstance(n.args[1], fx.Node) and n.args[1].target in (head, head + ".weight")]
    if not linears:
        raise InputError("no float linear layer (a weight attribute) produces this graph's output: a quantized or "
                         "lowered head cannot be replaced; pass head= or transfer before quantizing")
    n = linears[0]
    bias = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
    return n.args[1].target, (bias.target if bias is not None and bias.op == "get_attr" else None)


def _set_param(m: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = getattr_path(m, owner) if owner else m
    if name in mod._buffers:
        del mod._buffers[name]
    mod._parameters[name] = torch.nn.Parameter(value)


def transfer(model: torch.nn.Module, data: Iterable, *, num_outputs: int, head: str | None = None,
             freeze: Any = "backbone", unfreeze_after: int | None = None, backbone_lr: float = 0.1,
             epochs: int = 3, lr: float = 0.01, seed: int | None = 0,
             **finetune_options: Any) -> tuple[torch.nn.Module, Any]:
    """Replace the output layer with ``num_outputs`` outputs and train for the new task; returns
    ``(model, history)`` (a :class:`fxopt.FinetuneHistory` whose ``head`` names the layer replaced and
    ``frozen`` the parameters frozen at the start). Other options go to :func:`fxopt.finetune`."""
    from fxopt.train.training import FinetuneHistory, finetune
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxopt.transfer expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise InputError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    if freeze not in (None, "backbone") and not (isinstance(freeze, (list, tuple)) and
                                                  all(isinstance(g, str) for g in freeze)):
        raise InputError(f"freeze must be 'backbone', a list of name patterns or None, got {freeze!r}")
    if unfreeze_after is not None and (not isinstance(unfreeze_after, int) or unfreeze_after < 0):
        raise InputError(f"unfreeze_after must be an epoch count >= 0 (or None: never), got {unfreeze_after!r}")
    if iter(data) is data:  # type: ignore[call-overload]
        raise InputError("fxopt.transfer's data is a one-shot iterator; pass a list or a DataLoader (its first batch "
                         "checks the new head before training reads it)")
    with torch_internals():
        model = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    first = next(iter(data), None)
    if first is None:
        raise InputError("the training data is empty")
    inputs = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else first
    if isinstance(model, fx.GraphModule):
        w_name, b_name = _graph_head(model, head)
        w = getattr_path(model, w_name)
        fresh = torch.nn.Linear(w.shape[1], num_outputs).to(w.device, torch.float32)
        _set_param(model, w_name, fresh.weight.detach().clone())
        if b_name is not None:
            _set_param(model, b_name, fresh.bias.detach().clone())
        head_name, head_params = w_name, {w_name, b_name} - {None}
        _clear_shapes(model)
    else:
        head_name, layer = _module_head(model, head, inputs)
        fresh = torch.nn.Linear(layer.in_features, num_outputs, bias=layer.bias is not None)
        fresh = fresh.to(layer.weight.device, layer.weight.dtype)
        owner, _, attr = head_name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, fresh)
        head_params = {f"{head_name}.{n}" for n, _ in fresh.named_parameters()}
    from fxopt.train.training import _call, _logits
    try:
        with torch.no_grad():
            out = _logits(_call(model.eval(), inputs))
    except Exception as e:
        raise InputError(f"with head '{head_name}' replaced by {num_outputs} outputs the model no longer runs "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): a layer after the head depends "
                         "on its width; pass head= for the layer to replace") from e
    if out.shape[-1] != num_outputs:
        raise InputError(f"after replacing '{head_name}' the model outputs {out.shape[-1]} values, not "
                         f"{num_outputs}: that layer is not the output layer; pass head=")
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # what the user froze stays frozen
    if freeze == "backbone":
        frozen = [n for n in names if n not in head_params]
    elif freeze:
        frozen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in freeze)]
        if not frozen:
            raise InputError(f"freeze patterns {list(freeze)} match no parameter; names look like {names[:5]}")
    else:
        frozen = []
    phase1 = epochs if unfreeze_after is None or freeze != "backbone" else min(epochs, int(unfreeze_after))
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    history = FinetuneHistory()
    if phase1 > 0:
        # a frozen layer's batch norm keeps its running statistics too: no momentum (a module), or the
        # graph's inference batch norms left as they are (no train_bn)
        still = _frozen_norms(model, set(frozen))
        kept = [(bn, bn.momentum) for bn in still]
        for bn, _ in kept:
            bn.momentum = 0.0
        opts = dict(finetune_options)
        if isinstance(model, fx.GraphModule) and freeze == "backbone":
            opts.setdefault("train_bn", False)
        try:
            model, h1 = finetune(model, data, epochs=phase1, lr=lr, seed=seed, inplace=True, **opts)
        finally:
            for bn, m in kept:
                bn.momentum = m
        history.epochs += [{**e, "phase": "head"} for e in h1.epochs]
        history.steps += h1.steps
    if phase1 < epochs:
        for n in frozen:
            params[n].requires_grad_(True)
        mult = {n: backbone_lr for n in frozen}
        model, h2 = finetune(model, data, epochs=epochs - phase1, lr=lr, seed=seed, inplace=True,
                             lr_multipliers=mult, **finetune_options)
        history.epochs += [{**e, "epoch": e["epoch"] + phase1, "phase": "all"} for e in h2.epochs]
        history.steps += h2.steps
    for n in frozen:
        params[n].requires_grad_(True)
    history.head, history.frozen = head_name, frozen
    return model, history


def _frozen_norms(model: torch.nn.Module, frozen: set[str]) -> list[torch.nn.Module]:
    """The batch-norm modules whose affine parameters are all frozen."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            own = [f"{name}.{n}" for n, _ in mod.named_parameters()]
            if own and all(n in frozen for n in own):
                out.append(mod)
    return out


def _clear_shapes(gm: fx.GraphModule) -> None:
    """Shape metadata downstream of a new head is stale: drop it (the next fxopt.compile re-derives it)."""
    gm.recompile()

"""Hugging Face decoders and encoder-decoders called as a user calls them (tiny configs, random weights)."""
import os
import subprocess
import sys

import pytest
import torch

import fxopt

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=64, vocab_size=100,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(b, s):
    ids = torch.randint(0, 100, (b, s))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("make", [gpt2, llama])
def test_decoder_with_its_default_cache_compiles_and_keeps_the_output_structure(make):
    """``use_cache=True`` (the default) returns a DynamicCache: the compiled model returns one too,
    at another batch and sequence length, and the original model continues generating from it."""
    model = make()
    fast = fxopt.compile(model, kwargs=tokens(2, 16), strict=True)
    kw = tokens(3, 40)
    with torch.no_grad():
        out, ref = fast(**kw), model(**kw)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert type(out.past_key_values) is type(ref.past_key_values)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert out.past_key_values.get_seq_length() == 40
    for got, want in zip(out.past_key_values.layers, ref.past_key_values.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    step = torch.randint(0, 100, (3, 1))
    with torch.no_grad():
        a = model(input_ids=step, past_key_values=out.past_key_values).logits
        b = model(input_ids=step, past_key_values=ref.past_key_values).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [gpt2, llama])
def test_prune_50_on_a_decoder_called_with_its_default_cache(make):
    """The key/value cache starts as empty 1-D tensors that ``cat`` skips; the channel analysis once read
    their missing dimension and the whole prune was rolled back."""
    model = make()
    p = fxopt.compile(model, kwargs=tokens(2, 16), recipe="prune-50", strict=True)
    size = sum(t.numel() for t in p.parameters()) / sum(t.numel() for t in model.parameters())
    assert size < 0.85
    kw = tokens(3, 20)
    with torch.no_grad():
        out, ref = p(**kw), model(**kw)
    assert out.logits.shape == ref.logits.shape and out.past_key_values.get_seq_length() == 20


def test_cache_registration_only_fills_what_is_missing():
    from transformers.cache_utils import DynamicCache

    from fxopt.ir.capture import register_hf_caches
    model = gpt2()
    register_hf_caches(model)
    entry = torch.utils._pytree.SUPPORTED_NODES[DynamicCache]
    assert register_hf_caches(model) == []
    assert torch.utils._pytree.SUPPORTED_NODES[DynamicCache] is entry
    assert register_hf_caches(torch.nn.Linear(2, 2)) == []     # not a transformers model: nothing


_OWN_REGISTRATION = """
import torch, transformers, fxopt
from transformers.cache_utils import DynamicCache
from transformers.exporters import exporter_dynamo as hf
calls = []
def flatten(cache):
    calls.append(1)
    return hf._pytree_flatten(cache)
torch.utils._pytree.register_pytree_node(        # the user's own registration, made first
    DynamicCache, flatten, hf._pytree_unflatten, serialized_type_name="user.DynamicCache",
    flatten_with_keys_fn=hf._pytree_flatten_with_keys)
entry = torch.utils._pytree.SUPPORTED_NODES[DynamicCache]
config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
                                 bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config).eval()
ids = torch.randint(0, 50, (2, 8))
gm = fxopt.trace(model, kwargs={"input_ids": ids})
assert torch.utils._pytree.SUPPORTED_NODES[DynamicCache] is entry
out, ref = gm(input_ids=ids), model(input_ids=ids)
assert isinstance(out.past_key_values, DynamicCache) and calls
assert torch.allclose(out.past_key_values.layers[0].keys, ref.past_key_values.layers[0].keys, atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_a_registration_of_your_own_is_kept(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # run outside the repository: from its root, its kernels/ folder would shadow the `kernels` package
    run = subprocess.run([sys.executable, "-c", _OWN_REGISTRATION], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-2000:]


def test_gpt2_conv1d_layers_quantize_and_prune():
    """GPT-2's Conv1D layers are addmm(b, x, W[in, out]): canonicalized into linears, int8-dynamic
    quantizes all of them and prune-50 shrinks the MLPs."""
    model = gpt2()
    kw = {"input_ids": torch.randint(0, 100, (2, 16)), "use_cache": False}
    other = {"input_ids": torch.randint(0, 100, (3, 20)), "use_cache": False}
    with torch.no_grad():
        want = model(**other).logits
    q = fxopt.compile(model, kwargs=kw, recipe="int8-dynamic", strict=True)
    ops = [n.target for n in q.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fxopt.linear_int8_dynamic.default) == 9   # 4 Conv1D per layer, and the head
    assert torch.ops.aten.addmm.default not in ops and torch.ops.aten.linear.default not in ops
    with torch.no_grad():
        got = q(**other).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    p = fxopt.compile(model, kwargs=kw, recipe="prune-50", strict=True)
    size = sum(t.numel() for t in p.parameters()) / sum(t.numel() for t in model.parameters())
    assert size < 0.8
    with torch.no_grad():
        got = p(**other).logits
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9

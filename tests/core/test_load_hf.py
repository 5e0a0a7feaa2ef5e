"""Saving and loading Hugging Face models whose outputs hold library objects (decoder caches), safely."""
import io
import json
import os
import subprocess
import sys
import zipfile
import hashlib

import pytest
import torch

import fxopt

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(b=2, s=16):
    ids = torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2.fxopt"
    model = _gpt2()
    fast = fxopt.compile(model, kwargs=_tokens(), recipe="int8-dynamic")
    fxopt.save(fast, path)
    return model, fast, path


def test_a_decoder_that_returns_its_cache_saves_and_loads(saved_gpt2):
    model, fast, path = saved_gpt2
    loaded = fxopt.load(path)
    kw = _tokens(3, 20)
    got, want = loaded(**kw), fast(**kw)
    assert type(got) is type(want) and type(got.past_key_values) is type(want.past_key_values)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.past_key_values.layers[0].keys, want.past_key_values.layers[0].keys)


def test_a_saved_decoder_loads_in_a_fresh_process(saved_gpt2):
    """fxopt registers the cache classes it checks: the user need not import transformers first."""
    _, _, path = saved_gpt2
    code = (f"import torch, fxopt\nm = fxopt.load({str(path)!r})\nids = torch.randint(0, 100, (2, 9))\n"
            "out = m(input_ids=ids, attention_mask=torch.ones_like(ids))\n"
            "print('OK', type(out.past_key_values).__name__, tuple(out.logits.shape))")
    # run outside the repository: from its root, its kernels/ folder would shadow the `kernels` package
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=path.parent)
    assert "OK DynamicCache (2, 9, 100)" in done.stdout, done.stderr[-2000:]


def test_an_encoder_decoder_loads_and_runs_with_grad(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=32, d_kv=16,
                                   d_ff=64, vocab_size=100)
    model = transformers.T5Model(config).eval()
    kw = {"input_ids": torch.randint(0, 100, (2, 10)), "decoder_input_ids": torch.randint(0, 100, (2, 6))}
    fxopt.save(fxopt.compile(model, kwargs=kw), tmp_path / "t5.fxopt")
    loaded = fxopt.load(tmp_path / "t5.fxopt")
    with torch.enable_grad():  # the re-export's attention views would depend on the kernel's strides
        got = loaded(**kw).last_hidden_state
    torch.testing.assert_close(got, model(**kw).last_hidden_state, atol=1e-5, rtol=1e-5)


def _with_context(path, tmp_path, edit):
    """A copy of the saved file with the cache's pytree context edited (and the checksum recomputed)."""
    with zipfile.ZipFile(path) as z:
        manifest, blob = json.loads(z.read("manifest.json")), z.read("model.pt2")
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = "archive/models/model.json"
    doc = json.loads(members[name])
    sig = doc["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(sig["out_spec"])

    def walk(node):
        if isinstance(node["type"], str) and node["type"].endswith(":DynamicCache"):
            node["context"] = json.dumps(edit(json.loads(node["context"])))
        for k in node["children_spec"]:
            walk(k)
    walk(spec[1])
    sig["out_spec"] = json.dumps(spec)
    members[name] = json.dumps(doc).encode()
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    manifest["sha256"]["model.pt2"] = hashlib.sha256(inner.getvalue()).hexdigest()
    out = tmp_path / "crafted.fxopt"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("model.pt2", inner.getvalue())
    return out


@pytest.mark.parametrize("payload", [
    lambda m: {"_t": "seq", "p": "os:system", "v": [f"touch {m}"]},
    lambda m: {"_t": "obj", "p": "subprocess:Popen", "s": {}},
    lambda m: {"_t": "type", "p": "builtins:eval"},
    lambda m: {"_t": "map", "p": "transformers.cache_utils:os", "v": {}},
    lambda m: {"_t": "dtype", "n": "load"},
    lambda m: {"_t": "device", "s": "cpu; rm"},
    lambda m: {"_t": "seq", "p": "fxopt_hf_payload:Evil", "v": []},
])
def test_a_cache_context_that_names_other_classes_is_refused(saved_gpt2, tmp_path, payload):
    """transformers rebuilds cache contexts by importing the class path they name and calling it:
    fxopt accepts only its cache classes, so a crafted context cannot call os.system."""
    _, _, path = saved_gpt2
    marker = tmp_path / "PWNED"
    (tmp_path / "fxopt_hf_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil(list):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        crafted = _with_context(path, tmp_path, lambda ctx: {**ctx, "s": {**ctx["s"], "extra": payload(marker)}})
        with pytest.raises(fxopt.LoadError, match="refused"):
            fxopt.load(crafted)
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists() and "fxopt_hf_payload" not in sys.modules

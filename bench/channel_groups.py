"""Channel groups and structured pruning on the torchvision zoo: a fingerprint to compare commits.

    python bench/channel_groups.py [--models resnet18,swin_t] [--ratio 0.5]

Per model (random weights, seed 0, input 1x3x224x224): the channel groups the ``channel-groups``
analysis finds, how many are prunable, a hash of every group's description, blocks and cuts, and
after ``prune(ratio=R)`` the parameter count, the output's abs-sum, and the analysis time. Run it
at two commits and diff the outputs: a refactoring of the analysis or of ``prune`` must leave
every column but the time unchanged. Needs torchvision (`pip install "fxopt[models]"`).
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch

MODELS = ["resnet18", "densenet121", "shufflenet_v2_x0_5", "mobilenet_v3_small", "resnext50_32x4d",
          "regnet_y_400mf", "convnext_tiny", "swin_t", "vit_b_16", "efficientnet_b0", "googlenet",
          "squeezenet1_0", "mnasnet0_5", "maxvit_t"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ns = ap.parse_args()
    import torchvision.models as tvm

    import fxopt
    from fxopt.passes.analysis.dependency import channel_groups
    print(f"{'model':<20} {'groups':>6} {'prunable':>8} {'fingerprint':<12} {'params after':>13} "
          f"{'output abs-sum':>16} {'analysis s':>10}")
    for name in ns.models.split(","):
        torch.manual_seed(0)
        kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        model = getattr(tvm, name)(**kw).eval()
        x = torch.randn(1, 3, 224, 224)
        gm = fxopt.trace(model, (x,))
        t0 = time.perf_counter()
        groups = channel_groups(gm)
        seconds = time.perf_counter() - t0
        text = "\n".join(f"{g.describe()} {g.blocks} {g.cuts}" for g in groups)
        out = fxopt.compile(model, (x,), recipe=f"prune(ratio={ns.ratio})", verify=False)
        with torch.no_grad():
            y = out(x)
        print(f"{name:<20} {len(groups):>6} {sum(g.prunable for g in groups):>8} "
              f"{hashlib.md5(text.encode()).hexdigest()[:12]:<12} {sum(p.numel() for p in out.parameters()):>13} "
              f"{float(y.float().abs().sum()):>16.6g} {seconds:>10.3f}")


if __name__ == "__main__":
    main()

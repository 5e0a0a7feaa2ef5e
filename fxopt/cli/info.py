"""``fxopt info``: versions, this CPU's int8 plan and the GPU the Triton kernels would use (for bug reports)."""
from __future__ import annotations

import argparse


def cmd_info(ns: argparse.Namespace) -> int:
    """Versions and what this CPU offers for int8 (paste it into bug reports)."""
    import platform

    import torch

    from fxopt import __version__
    from fxopt.kernels import cpu_isa
    info = cpu_isa.cpu_info()
    print(f"fxopt {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print(f"cpu: {info.describe()}")
    print(f"cpu flags: {' '.join(info.flags) or '-'}")
    print(f"torch quantized engines: {', '.join(info.quantized_engines)}; {torch.get_num_threads()} threads")
    for label, (kind, shape) in cpu_isa.SAMPLE_LAYERS.items():
        a, w = cpu_isa.int8_plan(kind, shape)
        print(f"int8 {label} layers here use {a}-bit activation codes and {w}-bit weights"
              + (" (8 on both would saturate the kernels)" if min(a, w) == 7 and not info.forced else ""))
    print(f"debug switch: {cpu_isa.DEBUG_SWITCH}=avx2|vnni forces a plan "
          f"({'now ' + info.forced if info.forced else 'not set'})")
    print(f"gpu: {_gpu_line()}")
    return 0


def _gpu_line() -> str:
    import torch

    from fxopt.kernels.triton_common import HAS_TRITON, INTERPRET
    triton = "Triton " + __import__("triton").__version__ if HAS_TRITON else "no Triton (pip install 'fxopt[gpu]')"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), {triton}"
    return (f"none; {triton}{', interpreter on (TRITON_INTERPRET)' if INTERPRET else ''}: GPU-lowered graphs "
            "run their pure-torch references here")

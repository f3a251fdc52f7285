"""`python -m fastkd info`: what was built, and which backends are available (and what `auto` picks)."""
import platform

import torch

HELP = "what was built, and which backends are available"


def add_arguments(p) -> None:
    pass


def run(_args) -> int:
    import fastkd
    from fastkd import _ext, backends

    print(f"fastkd {fastkd.__version__}  (torch {torch.__version__}, python {platform.python_version()})")
    info = _ext.build_info()
    if info["loaded"]:
        print("compiled extension fastkd._C:")
        for key in ("torch", "cuda", "cuda_version", "cpu_isa", "cxx_flags", "platform"):
            print(f"  {key:13s} {info.get(key)}")
    else:
        print(f"compiled extension fastkd._C: NOT LOADED ({info['error']})\n  {info['hint']}")
    print("backends:")
    for name in backends.BACKENDS:
        why = backends._why_unavailable(name)
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + name + ' ' + why}")
    name, why = backends.auto_choice("cpu")
    print(f"auto picks: {name!r} for CPU tensors ({why})")
    if torch.cuda.is_available():
        name, why = backends.auto_choice("cuda")
        print(f"auto picks: {name!r} for CUDA tensors ({why})")
    else:
        print("no CUDA device visible (on CUDA tensors auto picks triton when it is installed, else torch)")
    return 0



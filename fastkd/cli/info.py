"""`python -m fastkd info`: what was built, and which backends are available (and what `auto` picks)."""
import platform

import torch

HELP = "what was built here, which backends run, and what backend=\"auto\" picks"


# The shared memory of the GPUs docs/backends.md plans for (CUDA programming guide, compute
# capabilities table): (compute capability major, bytes per block opt-in, bytes per SM).
PLAN_DEVICES = {"A100 (sm_80)": (8, 166912, 167936), "H100/H200 (sm_90)": (9, 232448, 233472),
                "B200 (sm_100)": (10, 232448, 233472)}
PLAN_OPS = ("dense_kd", "sparse_kd", "topk_teacher")


def add_arguments(p) -> None:
    p.add_argument("--cuda-plans", action="store_true",
                   help="print how the CUDA kernels split a row per (op, V, dtype, GPU) (kernels/plan.h)")


def cuda_plan_table(vocabs=(32000, 128256, 256000), dtypes=("bfloat16", "float32")) -> str:
    """A markdown table of kernels/plan.h's choices: per op, V, dtype and GPU, the blocks per row
    (a thread-block cluster when > 1), the shared memory each caches, and the reads of the inputs
    from HBM (dense_kd: forward KL; the other divergences read once more when not cached)."""
    from fastkd import _ext

    head = "| op | V | dtype | " + " | ".join(PLAN_DEVICES) + " |"
    lines = [head, "|" + " --- |" * (3 + len(PLAN_DEVICES))]
    for op in PLAN_OPS:
        for vocab in vocabs:
            for dtype in dtypes:
                cells = []
                for major, optin, per_sm in PLAN_DEVICES.values():
                    plan = _ext._C.cuda_plan(op, vocab, dtype, major, optin, per_sm)
                    split = f"{plan['cluster']} blocks (cluster)" if plan["cluster"] > 1 else "1 block"
                    cache = f"{plan['cache_bytes'] // 1024} KiB cached" if plan["cache_bytes"] else "not cached"
                    cells.append(f"{split}, {cache}, {plan['reads']} read{'s' if plan['reads'] > 1 else ''}")
                lines.append(f"| {op} | {vocab} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    import fastkd
    from fastkd import _ext, backends

    if getattr(args, "cuda_plans", False):
        print(cuda_plan_table())
        return 0

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
        print("no CUDA device visible (on CUDA tensors auto picks triton when it is installed, else torch: "
              f"{backends.AUTO_WHY['cuda']})")
    return 0



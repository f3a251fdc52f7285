"""`python -m fastkd bench`: fused fwd+bwd against naive eager PyTorch and torch.compile of it."""
import json
import os
import sys

import torch

HELP = "time and peak memory: fastkd vs naive eager vs torch.compile"


def add_arguments(b) -> None:
    b.add_argument("--shapes", default="1024x32000,256x128256", help="comma-separated NxV (default: %(default)s)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--temperature", type=float, default=2.0)
    b.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    b.add_argument("--impls", default=None, help="subset of fastkd,eager,compiled")
    b.add_argument("--device", default="cpu")
    b.add_argument("--output", default=None, help="also write the table (markdown) here")
    b.add_argument("--json", default=None, help="also write the rows as JSON here ('-' for stdout)")
    b.add_argument("--no-progress", action="store_true")


def _shapes(text: str):
    out = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        out.append((int(n), int(v)))
    return out


def run(args) -> int:
    from fastkd import bench

    known = ("fastkd", "eager", "compiled")
    unknown = [i for i in (args.impls.split(",") if args.impls else []) if i not in known]
    if unknown:
        raise SystemExit(f"--impls: unknown {', '.join(unknown)}; choose from {','.join(known)}")
    rows = bench.run(_shapes(args.shapes), dtype=args.dtype, temperature=args.temperature,
                     repeats=args.repeats, impls=args.impls.split(",") if args.impls else None,
                     device=args.device, progress=not args.no_progress)
    threads = torch.get_num_threads()
    head = (f"fastkd bench: fwd+bwd, forward KL, T={args.temperature}, {args.dtype}, "
            f"device={args.device}, {threads} threads, {os.cpu_count()} cores, torch {torch.__version__}")
    text = head + "\n\n" + bench.format_table(rows)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        json.dump(rows, sys.stdout if args.json == "-" else open(args.json, "w"), indent=1)
    return 0



"""`python -m fastkd bench`: fused fwd+bwd against naive eager PyTorch and torch.compile of it."""
import argparse
import json
import math
import os
import sys

import torch

from . import UsageError

HELP = "time and peak memory of the fused loss against naive PyTorch and torch.compile"


def _shapes(text: str):
    """--shapes: comma-separated NxV, each N >= 1 rows and V >= 1 columns."""
    out = []
    for item in text.split(","):
        n, x, v = item.strip().lower().partition("x")
        if not (x and n.isdigit() and v.isdigit() and int(n) >= 1 and int(v) >= 1):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not NxV with N, V >= 1 (e.g. 1024x32000)")
        out.append((int(n), int(v)))
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device visible to torch {torch.__version__}")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmark runs on cpu or cuda")
    return text


def _output_file(text: str) -> str:
    """A file this run can create or overwrite (checked before the benchmark, not after it)."""
    if text == "-":
        return text
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def add_arguments(b) -> None:
    b.add_argument("--shapes", type=_shapes, default="1024x32000,256x128256",
                   help="comma-separated NxV (default: %(default)s)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--temperature", type=_temperature, default=2.0)
    b.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per case (median reported)")
    b.add_argument("--impls", default=None, help="subset of fastkd,eager,compiled")
    b.add_argument("--device", type=_device, default="cpu")
    b.add_argument("--output", type=_output_file, default=None, help="also write the table (markdown) here")
    b.add_argument("--json", type=_output_file, default=None, help="also write the rows as JSON here ('-' for stdout)")
    b.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from fastkd import bench

    known = ("fastkd", "eager", "compiled")
    unknown = [i for i in (args.impls.split(",") if args.impls else []) if i not in known]
    if unknown:
        raise UsageError(f"--impls: unknown {', '.join(unknown)}; choose from {','.join(known)}")
    if args.output == "-":
        raise UsageError("--output: give a file name ('-' is for --json)")
    rows = bench.run(args.shapes, dtype=args.dtype, temperature=args.temperature,
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



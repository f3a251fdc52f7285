"""`python -m fastkd bench`: fused fwd+bwd against naive eager PyTorch and torch.compile of it,
side by side in one run: time per call and peak memory growth."""
import argparse
import json
import math
import os
import sys

import statistics
import time

import torch
import torch.nn.functional as F

from . import UsageError, _memory
from ..dense_kd import kd_loss

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
    known = ("fastkd", "eager", "compiled")
    unknown = [i for i in (args.impls.split(",") if args.impls else []) if i not in known]
    if unknown:
        raise UsageError(f"--impls: unknown {', '.join(unknown)}; choose from {','.join(known)}")
    if args.output == "-":
        raise UsageError("--output: give a file name ('-' is for --json)")
    rows = run_cases(args.shapes, dtype=args.dtype, temperature=args.temperature,
                     repeats=args.repeats, impls=args.impls.split(",") if args.impls else None,
                     device=args.device, progress=not args.no_progress)
    threads = torch.get_num_threads()
    head = (f"fastkd bench: fwd+bwd, forward KL, T={args.temperature}, {args.dtype}, "
            f"device={args.device}, {threads} threads, {os.cpu_count()} cores, torch {torch.__version__}")
    text = head + "\n\n" + format_table(rows)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        json.dump(rows, sys.stdout if args.json == "-" else open(args.json, "w"), indent=1)
    return 0


# ---- the measurements -------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_kd_loss(student, teacher, temperature: float):
    """What a training loop writes without fastkd: log_softmax + kl_div, fp32, T^2-scaled."""
    lq = F.log_softmax(student.float() / temperature, dim=-1)
    lp = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean") * temperature**2


def implementations(temperature: float, divergence: str = "forward_kl"):
    """name -> loss(student, teacher). The naive ones are forward KL only."""
    impls = {
        "fastkd": lambda s, t: kd_loss(s, t, temperature=temperature, divergence=divergence),
    }
    if divergence == "forward_kl":
        impls["eager"] = lambda s, t: naive_kd_loss(s, t, temperature)
        impls["compiled"] = torch.compile(lambda s, t: naive_kd_loss(s, t, temperature), dynamic=False)
    return impls


def time_fwd_bwd(loss_fn, student, teacher, repeats: int, warmup: int = 3):
    """Seconds per fwd+bwd: (median, min) over `repeats` timed calls, after `warmup` calls (the
    first calls of a process fault in fresh memory and, for torch.compile, compile)."""
    x = student.detach().requires_grad_(True)
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        t0 = time.perf_counter()
        loss_fn(x, teacher).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def peak_fwd_bwd(loss_fn, student, teacher) -> int:
    """Peak memory growth (bytes) of one fwd+bwd, the student's .grad included."""
    x = student.detach().requires_grad_(True)

    def step():
        loss_fn(x, teacher).backward()

    return _memory.peak_growth(step, str(student.device))


def run_cases(shapes, dtype="fp32", temperature=2.0, repeats=5, impls=None, device="cpu", progress=True):
    """One row per (shape, implementation): dicts with time and memory figures."""
    from tqdm import tqdm

    table = implementations(temperature)
    names = [n for n in (impls or table) if n in table]
    rows = []
    bar = tqdm(total=len(shapes) * len(names), disable=not progress, desc="bench", unit="case")
    for n, v in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        s = (torch.randn(n, v, generator=g, device=device) * 2).to(DTYPES[dtype])
        t = (torch.randn(n, v, generator=g, device=device) * 2).to(DTYPES[dtype])
        ref = None
        for name in names:
            bar.set_postfix_str(f"{n}x{v} {name}")
            med, best = time_fwd_bwd(table[name], s, t, repeats)
            peak = peak_fwd_bwd(table[name], s, t) if _memory.cpu_supported() or device != "cpu" else None
            ref = med if name == "eager" else ref
            rows.append(dict(N=n, V=v, dtype=dtype, impl=name, median_ms=med * 1e3, min_ms=best * 1e3,
                             peak_bytes=peak, peak_x=None if peak is None else peak / (n * v * 4)))
            bar.update()
        for r in rows:
            if (r["N"], r["V"]) == (n, v) and ref:
                r["vs_eager"] = ref * 1e3 / r["median_ms"]
    bar.close()
    return rows


# glibc serves allocations under its (adaptive, at most 32 MiB) mmap threshold from memory kept
# from earlier frees, which the resident set does not show: below this, peak growth reads low.
RSS_RELIABLE_BYTES = 32 << 20


def format_table(rows) -> str:
    head = "| N | V | dtype | impl | median ms | min ms | speed-up vs eager | peak growth (x N*V fp32) |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        peak = "n/a" if r["peak_x"] is None else f"{r['peak_x']:.2f}"
        vs = f"{r['vs_eager']:.1f}x" if r.get("vs_eager") else "-"
        lines.append(f"| {r['N']} | {r['V']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {vs} | {peak} |")
    if any(r["N"] * r["V"] * 4 < RSS_RELIABLE_BYTES for r in rows):
        lines.append("\nPeak growth of shapes under 32 MiB per N*V fp32 tensor reads low on CPU: glibc "
                     "reuses memory freed earlier, which the resident set does not show.")
    return "\n".join(lines)

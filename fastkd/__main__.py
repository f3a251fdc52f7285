"""Command line: `python -m fastkd info`, `python -m fastkd bench` and `python -m fastkd cache`."""
import argparse
import json
import os
import platform
import sys

import torch


def _info(_args) -> int:
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
    for device in ("cpu", "cuda"):
        name, why = backends.auto_choice(device)
        print(f"auto picks: {name!r} for {device.upper()} tensors ({why})")
    if not torch.cuda.is_available():
        print("(no CUDA device visible)")
    return 0


def _shapes(text: str):
    out = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        out.append((int(n), int(v)))
    return out


def _bench(args) -> int:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastkd", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="what was built, and which backends are available").set_defaults(fn=_info)
    b = sub.add_parser("bench", help="time and peak memory: fastkd vs naive eager vs torch.compile")
    b.add_argument("--shapes", default="1024x32000,256x128256", help="comma-separated NxV (default: %(default)s)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--temperature", type=float, default=2.0)
    b.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    b.add_argument("--impls", default=None, help="subset of fastkd,eager,compiled")
    b.add_argument("--device", default="cpu")
    b.add_argument("--output", default=None, help="also write the table (markdown) here")
    b.add_argument("--json", default=None, help="also write the rows as JSON here ('-' for stdout)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=_bench)
    from fastkd.cache import cli as cache_cli

    c = sub.add_parser("cache", help="run a teacher over tokens and write its sparse rows to a cache",
                       description=cache_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_cli.add_arguments(c)
    c.set_defaults(fn=cache_cli.run)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

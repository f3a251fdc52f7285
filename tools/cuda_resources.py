"""Registers, spills and shared memory of every CUDA kernel instantiation, from `make cuda-check`.

`make cuda-check` compiles kernels/*.cu with `-Xptxas -v` and keeps each file's ptxas report in
build/cuda-check/<op>.log; this reads them, holds each instantiation to the budgets -- no spill,
and registers that let kMinBlocksPerSm blocks of the plan's largest size share an SM (the
kernels' __launch_bounds__, kernels/plan.h) -- and compares the table with the one in
docs/kernel-resources.md (--check, what cuda-check runs) or rewrites it (--write).

    python tools/cuda_resources.py [--check | --write] [LOG ...]
"""
import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernel-resources.md"
BEGIN, END = "<!-- cuda:begin -->", "<!-- cuda:end -->"


def plan_constants():
    """kMaxThreads, kMaxThreadsFp64, kMinBlocksPerSm from kernels/plan.h (the one place they live)."""
    text = (ROOT / "kernels" / "plan.h").read_text()
    return {name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))
            for name in ("kMaxThreads", "kMaxThreadsFp64", "kMinBlocksPerSm")}


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    clean = []
    for name in out:
        name = re.sub(r"fastkd::cuda::\(anonymous namespace\)::|fastkd::cuda::|fastkd::|^void ", "", name)
        name = re.sub(r"\((\w+)\)$", "", re.sub(r"\(\w+Launch\)$", "", name))
        clean.append(name.replace("(Divergence)", "D=").replace("__nv_bfloat16", "bf16").replace("__half", "half"))
    return clean


def parse(paths):
    """[(file, arch, kernel, regs, stack, spill stores, spill loads, smem)] from ptxas -v reports."""
    rows = []
    for path in paths:
        text = pathlib.Path(path).read_text()
        entries = re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'\n"
                             r"(.*?)(?=ptxas info    : Compiling entry|\Z)",
                             text, re.S)
        names = demangle([e[0] for e in entries])
        for (_, arch, body), name in zip(entries, names):
            spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
            regs = re.search(r"Used (\d+) registers", body)
            smem = re.search(r"(\d+) bytes smem", body)
            if not (spill and regs):
                raise SystemExit(f"{path}: no resource line for {name} ({arch}); was it compiled with -Xptxas -v?")
            rows.append((pathlib.Path(path).stem, arch, name, int(regs.group(1)), int(spill.group(1)),
                         int(spill.group(2)), int(spill.group(3)), int(smem.group(1)) if smem else 0))
    return sorted(rows, key=lambda r: (r[0], r[2], r[1]))


def elem_bytes(kernel: str) -> int:
    dtype = re.search(r"<(\w+)", kernel).group(1)
    return {"half": 2, "bf16": 2, "float": 4, "double": 8}[dtype]


def problems(rows, c):
    out = []
    for op, arch, kernel, regs, _, spill_st, _, _ in rows:
        threads = c["kMaxThreadsFp64"] if elem_bytes(kernel) == 8 else c["kMaxThreads"]
        cap = 65536 // (c["kMinBlocksPerSm"] * threads)
        if spill_st:
            out.append(f"{arch} {kernel}: spills {spill_st} B")
        if regs > cap:
            out.append(f"{arch} {kernel}: {regs} registers, more than {cap} "
                       f"({c['kMinBlocksPerSm']} blocks of {threads})")
    return out


def table(rows, c) -> str:
    archs = sorted({r[1] for r in rows}, key=lambda a: int(re.sub(r"\D", "", a)))
    kernels = sorted({(r[0], r[2]) for r in rows})
    by = {(r[0], r[2], r[1]): r for r in rows}
    head = ["file", "kernel", "threads x blocks/SM"] + [f"{a} regs / spill B / smem B" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, kernel in kernels:
        threads = c["kMaxThreadsFp64"] if elem_bytes(kernel) == 8 else c["kMaxThreads"]
        cells = []
        for a in archs:
            r = by.get((op, kernel, a))
            cells.append("" if r is None else f"{r[3]} / {r[5]} / {r[7]}")
        lines.append("| " + " | ".join([op, f"`{kernel}`", f"{threads} x {c['kMinBlocksPerSm']}"] + cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"fail when {DOC.relative_to(ROOT)} disagrees")
    mode.add_argument("--write", action="store_true", help=f"rewrite the CUDA table of {DOC.relative_to(ROOT)}")
    ap.add_argument("logs", nargs="*")
    a = ap.parse_args(argv)
    logs = a.logs or sorted(str(p) for p in (ROOT / "build" / "cuda-check").glob("*.log"))
    if not logs:
        raise SystemExit("no ptxas reports: run `make cuda-check` first")
    c = plan_constants()
    rows = parse(logs)
    tab = table(rows, c)
    bad = problems(rows, c)
    for b in bad:
        print("cuda-resources: " + b)
    doc = DOC.read_text() if DOC.is_file() else ""
    if a.write:
        if BEGIN in doc:
            doc = doc.split(BEGIN)[0] + BEGIN + "\n" + tab + END + doc.split(END, 1)[1]
        else:
            doc += f"\n{BEGIN}\n{tab}{END}\n"
        DOC.write_text(doc)
        print(f"cuda-resources: wrote {len(rows)} instantiations to {DOC.relative_to(ROOT)}")
    elif a.check:
        current = doc.split(BEGIN)[1].split(END)[0].strip() if BEGIN in doc else ""
        if current != tab.strip():
            print(f"cuda-resources: the CUDA table of {DOC.relative_to(ROOT)} is stale: run "
                  "`python tools/cuda_resources.py --write` after `make cuda-check` and commit it")
            return 1
    else:
        print(tab)
    print(f"cuda-resources: {len(rows)} instantiations, {len(bad)} over budget")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

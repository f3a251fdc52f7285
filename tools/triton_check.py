"""Every Triton kernel of fastkd through Triton's real compiler, ahead of time, without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU tensors) compiles
nothing. This compiles each kernel, in every configuration its launchers choose, for real targets
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, Triton's whole pipeline down
to a cubin with its bundled ptxas), reads each program's registers, spills and shared memory
(`ptxas -v`, the ptxas Triton used), and holds it to the budgets of docs/design.md section 3:
  - it compiles, with every Triton version named;
  - no spill store in a bf16/fp16/fp32 configuration (fp64 may spill: the table lists it);
  - at most 128 registers a thread in an 8-warp program (two programs per SM), unless
    REGISTER_EXCEPTIONS says why;
  - at most BUDGET_S seconds to compile one configuration.

The configurations are the launchers' own: each launcher of fastkd/triton runs under
fastkd.triton._config.recording() -- which records the launches instead of making them -- over a
sweep of vocabularies, dtypes and options (sweep() below), under FASTKD_TRITON_AUTOTUNE=0 and =1,
and every distinct launch is compiled. `--subset` keeps a covering subset: every kernel x dtype x
code-path constexpr (divergence, tail, key width; the flags all on and all off -- for the
vocab-parallel partial forms, all on) at the largest block its launcher picks. `make test` runs
the subset for sm_90 with both Triton versions and compares it with docs/kernel-resources.md;
`make triton-check` runs everything for sm_90 and sm_80 and rewrites that table.

    python tools/triton_check.py [--subset] [--archs 90,80] [--triton 3.6=DIR ...] [--jobs N]
                                 [--json FILE] [--only A,B] [--write-docs | --check-docs | --merge-docs]

`--triton NAME=DIR` compiles again with the Triton installed in DIR (`pip install --target DIR
triton==X`); the venv's own Triton always runs, named by its version.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout, as_completed

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the budgets and docs/kernel-resources.md's table: tools/triton_budgets.py
from triton_budgets import (BUDGET_S, DOC, MAX_REGS_8_WARPS, REGISTER_EXCEPTIONS, cell,  # noqa: E402,F401
                            merge_doc, parse_doc_table, row_key, table, verdict, write_doc)
VOCABS = (70, 32000, 128256, 256000)  # one block; the common LLM vocabularies
TOPK_KS = (1, 2, 3, 5, 9, 17, 33, 64, 100, 256, 1000)  # every K_PAD the launcher can pick
SPARSE_KS = (1, 64, 1000)
SAMPLES = (1, 2, 12, 64, 256)
# (labels, hard-label term, gradient): every combination the ops accept
FLAGS = ((False, False, False), (False, False, True), (True, False, False), (True, False, True), (True, True, False),
         (True, True, True))
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
               "int32": "i32"}


# ---------------------------------------------------------------------------------------------
# The sweep: the launchers' choices (runs in this process, with any Triton: nothing compiles)

def _spec(kernel, args: dict) -> dict:
    """The compile signature of one recorded launch: {arg: type} plus constexprs and the ints
    the JIT would mark divisible by 16 -- what `kernel[grid](**args)` would specialise on."""
    import torch
    import triton.language as tl

    sig, const, div16 = {}, {}, []
    for p in kernel.params:
        name, v = p.name, args[p.name]
        if p.is_constexpr:
            const[name] = str(v) if isinstance(v, tl.dtype) else v
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + DTYPE_NAMES[str(v.dtype).removeprefix("torch.")]
            div16.append(name)  # torch allocations are aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT specialises an int of 1 as a constant
                const[name], sig[name] = 1, "constexpr"
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    div16.append(name)
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(v).__name__}")
    return {"module": kernel.fn.__module__, "name": kernel.fn.__name__, "sig": sig, "const": const, "div16": div16}


def partial_forms(take, record, s, on, grad, dtype, largest):
    """The partial forms' launches at one end of the flags (on: labels, hard-label term and
    gradient all on; else all off)."""
    import torch

    from fastkd import _math, _ops
    from fastkd.triton.dense_kd_finish import dense_kd_finish
    from fastkd.triton.dense_kd_shard import dense_kd_shard
    from fastkd.triton.dense_kd_stats import dense_kd_stats
    from fastkd.triton.sparse_kd_shard import sparse_kd_shard
    from fastkd.triton.sparse_kd_stats import sparse_kd_stats

    flags = "LHG" if on else "-"
    row = torch.zeros(1, 8, dtype=torch.float64)
    local = torch.full((1,), -1) if on else None
    for div in _math.DIVERGENCES:
        calls = record(dense_kd_shard, s, s, local, row, div, 2.0, 0.5, -1, 0.5 if on else 0.0, True, 1.0, grad)
        take(calls, "dense_kd_shard", f"{div} {flags}", dtype, largest and on, False)
    ids, lp = torch.arange(64).unsqueeze(0) % s.shape[1], torch.full((1, 64), -5.0)
    if on:
        take(record(sparse_kd_shard, s, ids, lp, local, row, 2.0, -1, 0.5, True, 1.0), "sparse_kd_shard",
             f"k=64 {flags}", dtype, largest, False)
        return
    for h in (False, True):  # the statistics take no labels: the hard-label sums on and off
        take(record(dense_kd_stats, s, s, 2.0, h), "dense_kd_stats", "H" if h else "-", dtype, largest and h, False)
        take(record(sparse_kd_stats, s, ids, lp, 2.0, h), "sparse_kd_stats", f"k=64 {'H' if h else '-'}", dtype,
             largest and h, False)
    g = torch.zeros(s.shape, dtype=_ops.grad_dtype(dtype))
    take(record(dense_kd_finish, g, s, row, 2.0, 0.5), "dense_kd_finish", "-", dtype, largest, False)


def sweep():
    """Every distinct launch of the launchers over the sweep: a list of jobs (dicts) with
    kernel, options (a readable label), dtype, BLOCK, warps, subset flag and compile spec."""
    import torch

    from fastkd import _math
    from fastkd._math import TAILS
    from fastkd.triton import _config
    from fastkd.triton.dense_kd import dense_kd
    from fastkd.triton.sample_teacher_draws import sample_teacher_draws
    from fastkd.triton.sparse_kd import sparse_kd
    from fastkd.triton.topk_teacher import topk_teacher

    jobs, seen = [], {}

    def take(calls, kernel, options, dtype, subset, autotune):
        for kern, args, opts in calls:
            spec = _spec(kern, args)
            warps = opts["num_warps"]
            key = json.dumps([spec, opts], sort_keys=True)
            job = seen.get(key)
            if job is None:
                job = {"kernel": kernel, "options": options, "dtype": DTYPE_NAMES[str(dtype)[6:]],
                       "block": args["BLOCK"], "warps": warps, "maxnreg": opts.get("maxnreg"), "subset": False,
                       "autotune": autotune, "spec": spec}
                seen[key] = job
                jobs.append(job)
            job["subset"] |= subset and not autotune

    def record(fn, *a, **kw):
        with _config.recording() as calls:
            fn(*a, **kw)
        return calls

    saved = _config.AUTOTUNE
    try:
        for autotune in (False, True):
            _config.AUTOTUNE = autotune
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for vocab in VOCABS:
                    largest = vocab == 128256  # at (or beyond) every kernel's largest block
                    if autotune and not largest:
                        continue  # the candidates do not depend on V
                    s = torch.zeros(1, vocab, dtype=dtype)
                    for labels, hard, grad in FLAGS:
                        edge = (labels, hard, grad) in ((True, True, True), (False, False, False))
                        if (autotune or vocab < 128256) and not edge:
                            continue  # every combination at the largest block; elsewhere the two ends
                        lab = torch.zeros(1, dtype=torch.long) if labels else None
                        flags = "".join(c for c, on in zip("LHG", (labels, hard, grad)) if on) or "-"
                        for div in _math.DIVERGENCES:
                            calls = record(dense_kd, s, s, lab, div, 2.0, 0.5, -100, 0.5 if hard else 0.0, True, 1.0,
                                           grad)
                            take(calls, "dense_kd", f"{div} {flags}", dtype, largest and edge, autotune)
                        for tail in TAILS:
                            for k in SPARSE_KS:
                                if k > vocab or k != 64 and (autotune or (labels, hard, grad) != (True, True, True)):
                                    continue
                                ids = torch.arange(k).unsqueeze(0)
                                lp = torch.full((1, k), -float(k) - 1.0)
                                calls = record(sparse_kd, s, ids, lp, torch.full((1,), -0.01), lab, tail, 2.0, -100,
                                               0.5 if hard else 0.0, True, 1.0, grad)
                                take(calls, "sparse_kd", f"{tail} k={k} {flags}", dtype, largest and edge and k == 64,
                                     autotune)
                        # the vocab-parallel partial forms (labels: this slice's ids, -1 ignored), at the two
                        # ends of the flags; their subset: all on (their divergence and walk code is that of
                        # the kernels above). They are not autotuned.
                        if edge and not autotune:
                            partial_forms(take, record, s, lab is not None, grad, dtype, largest)
                    if autotune:
                        continue
                    for k in TOPK_KS:
                        if k <= vocab:
                            take(record(topk_teacher, s, k, 2.0), "topk_teacher", f"k={k}", dtype,
                                 largest and k == 64, False)
                    for n in SAMPLES:
                        u = torch.zeros(1, n, dtype=torch.float64)
                        take(record(sample_teacher_draws, s, u, 2.0), "sample_teacher_draws", f"S={n}", dtype,
                             largest and n == 12, False)
    finally:
        _config.AUTOTUNE = saved
    return jobs


# ---------------------------------------------------------------------------------------------
# The worker: compiles jobs with the Triton on its sys.path (a process per Triton version)

def _compile(job):
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv

    spec, arch = job["spec"], job["arch"]
    out = {"id": job["id"], "arch": arch, "triton": triton.__version__}
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["name"])
        const = {k: ({"fp32": tl.float32, "fp64": tl.float64}[v] if isinstance(v, str) else v)
                 for k, v in spec["const"].items()}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec["div16"]}
        src = triton.compiler.ASTSource(fn=fn, signature=dict(spec["sig"]), constexprs=const, attrs=attrs)
        options = {"num_warps": job["warps"], **({"maxnreg": job["maxnreg"]} if job["maxnreg"] else {})}
        kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["smem"] = kern.metadata.shared
        ptxas = nv.get_ptxas(arch).path
        tmp = pathlib.Path(os.environ["TRITON_CACHE_DIR"]) / "check.ptx"
        tmp.write_text(kern.asm["ptx"])
        log = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={nv.sm_arch_from_capability(arch)}", str(tmp),
                              "-o", str(tmp) + ".cubin"], capture_output=True, text=True)
        text = log.stdout + log.stderr
        m = re.search(r"Used (\d+) registers", text)
        s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if log.returncode or not m or not s:
            raise RuntimeError(f"ptxas -v gave no resource line: {text[-500:]}")
        out.update(ok=True, regs=int(m.group(1)), stack=int(s.group(1)), spill_st=int(s.group(2)),
                   spill_ld=int(s.group(3)))
    except Exception as e:  # noqa: BLE001 -- every failure is a result
        out.update(ok=False, seconds=round(time.perf_counter() - t0, 1),
                   error=f"{type(e).__name__}: {e}".strip()[:3000])
    return out


def _warm():
    import tempfile

    os.environ.pop("TRITON_INTERPRET", None)
    # a cache of its own per process, so every compile is measured from nothing (a user's first call)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=os.environ.get("FASTKD_CHECK_TMP"))
    import fastkd.triton.dense_kd  # noqa: F401  (the kernels' modules, imported once per process)
    import fastkd.triton.sample_teacher_draws  # noqa: F401
    import fastkd.triton.sparse_kd  # noqa: F401
    import fastkd.triton.topk_teacher  # noqa: F401
    import fastkd.triton.dense_kd_finish  # noqa: F401
    import fastkd.triton.dense_kd_shard  # noqa: F401
    import fastkd.triton.dense_kd_stats  # noqa: F401
    import fastkd.triton.sparse_kd_shard  # noqa: F401
    import fastkd.triton.sparse_kd_stats  # noqa: F401


def worker(n_jobs: int, deadline: float) -> None:
    """Read jobs (JSON) on stdin, write one JSON result a line on stdout as each finishes."""
    jobs = json.load(sys.stdin)
    ex = ProcessPoolExecutor(n_jobs, initializer=_warm)
    futures = {ex.submit(_compile, j): j for j in jobs}
    try:
        for f in as_completed(futures, timeout=deadline):
            print(json.dumps(f.result()), flush=True)
    except FutureTimeout:
        for f, j in futures.items():
            if not f.done():
                print(json.dumps({"id": j["id"], "arch": j["arch"], "ok": False, "seconds": deadline,
                                  "error": f"not finished within the check's deadline of {deadline:.0f} s"}),
                      flush=True)
        for p in list(getattr(ex, "_processes", {}).values()):
            p.kill()
    ex.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Budgets, the table, the orchestration


def run_version(label, path, jobs, archs, n_jobs, deadline):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (it warns otherwise)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT), env.get("PYTHONPATH", "")) if p)
    todo = [{**j, "arch": a} for a in archs for j in jobs]
    scratch = tempfile.mkdtemp(prefix="fastkd-triton-check-")
    env["FASTKD_CHECK_TMP"] = scratch
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--jobs", str(n_jobs), "--deadline", str(deadline)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    proc.stdin.write(json.dumps(todo))
    proc.stdin.close()
    by_id = {j["id"]: j for j in jobs}
    out, done = {}, 0
    for line in proc.stdout:
        res = json.loads(line)
        version = res.get("triton", label)
        out[(res["id"], res["arch"])] = res
        done += 1
        job = by_id[res["id"]]
        why = verdict(job, res)
        print(f"[{label} {done}/{len(todo)}] sm_{res['arch']} {job['kernel']} {job['options']} {job['dtype']} "
              f"B{job['block']}x{job['warps']}{' autotune' if job['autotune'] else ''}: "
              f"{cell(res)} regs, {res.get('seconds')} s{'  <-- ' + why if why else ''}", flush=True)
        if version != label:
            raise SystemExit(f"--triton {label}={path} imported Triton {version}")
    proc.wait()
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", action="store_true", help="the covering subset (make test)")
    ap.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90,80")
    ap.add_argument("--triton", action="append", default=[], metavar="NAME=DIR",
                    help="also compile with the Triton installed in DIR (pip install --target DIR triton==NAME)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds for all compiles of one Triton version")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--only", default="", help="keep the jobs whose kernel/options/dtype contain this "
                                               "(several: comma-separated)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write-docs", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)} (needs the full run)")
    mode.add_argument("--check-docs", action="store_true", help=f"fail when {DOC.relative_to(ROOT)} disagrees")
    mode.add_argument("--merge-docs", action="store_true",
                      help=f"replace or add the compiled rows in {DOC.relative_to(ROOT)}, keep the others "
                           "(with --only: a new kernel's rows without the whole run)")
    ap.add_argument("--list", action="store_true", help="print the configurations (JSON), compile nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.jobs, a.deadline)

    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import triton

    t0 = time.time()
    only = a.only.split(",")
    jobs = [j for j in sweep() if (j["subset"] or not a.subset)
            and any(o in f"{j['kernel']} {j['options']} {j['dtype']}" for o in only)]
    for i, j in enumerate(jobs):
        j["id"] = i
    if a.list:
        print(json.dumps([{"key": row_key(j), "subset": j["subset"], "kernel": j["kernel"], "name": j["spec"]["name"],
                           "module": j["spec"]["module"]} for j in jobs], indent=1))
        return 0
    archs = [int(x) for x in a.archs.split(",")]
    versions = [(triton.__version__, "")] + [tuple(t.split("=", 1)) for t in a.triton]
    print(f"triton-check: {len(jobs)} configurations x sm_{', sm_'.join(map(str, archs))} x Triton "
          f"{', '.join(v for v, _ in versions)} ({a.jobs} at a time)", flush=True)
    results = {}
    for label, path in versions:
        for (i, arch), res in run_version(label, path, jobs, archs, a.jobs, a.deadline).items():
            results[(i, arch, label)] = res
    names = [v for v, _ in versions]
    failures = []
    for j in jobs:
        for arch in archs:
            for v in names:
                res = results.get((j["id"], arch, v))
                why = "FAILED: no result" if res is None else verdict(j, res)
                if why:
                    failures.append(f"sm_{arch} Triton {v} {' '.join(row_key(j))}: {why}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"jobs": jobs, "results": [
            {**r, "key": list(row_key(jobs[i])), "version": v} for (i, arch, v), r in results.items()]}, indent=1))
    stale = []
    if a.write_docs:
        write_doc(table(jobs, results, names, archs))
        print(f"triton-check: wrote {DOC.relative_to(ROOT)}")
    elif a.merge_docs:
        merge_doc(table(jobs, results, names, archs))
        print(f"triton-check: merged {len(jobs)} rows into {DOC.relative_to(ROOT)}")
    elif a.check_docs:
        doc = parse_doc_table()
        for (i, arch, v), res in results.items():
            key = row_key(jobs[i]) + (f"sm_{arch} {v}",)
            if doc.get(key) != cell(res):
                stale.append(f"{' '.join(key)}: compiled {cell(res)!r}, the table says {doc.get(key)!r}")
    took = time.time() - t0
    slowest = max((r.get("seconds", 0) for r in results.values()), default=0)
    print(f"triton-check: {len(results)} compiles in {took:.0f} s (slowest {slowest} s), "
          f"{len(failures)} over budget or failing, {len(stale)} differing from {DOC.relative_to(ROOT)}")
    for f in failures:
        print("  " + f)
    for s in stale[:20]:
        print("  stale: " + s)
    if stale:
        print(f"  ({len(stale)} cells) the table is stale: run `make triton-check` and commit {DOC.relative_to(ROOT)}")
    return 1 if failures or stale else 0


if __name__ == "__main__":
    sys.exit(main())

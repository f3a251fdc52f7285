"""Every GPU op of fastkd once per backend against backend "torch", one line per case.

    python tools/gpu_smoke.py triton,cuda [--tiny | --full] [--device cuda]

Each case runs in its own try, so a launch error names the case that raised it; the exit status
is 1 when any case fails. --tiny: small shapes for compute-sanitizer; --full: every dtype x
divergence x V (for `cuda`, which compiles nothing at run time); the default keeps the number of
Triton specialisations small (each is a JIT compile on a cold cache). --device cpu runs the same
cases on CPU tensors (Triton under TRITON_INTERPRET=1), to test this script without a GPU.
"""
import argparse
import pathlib
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout built in place
import fastkd  # noqa: E402

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def plan(mode):
    """[(rows, V, dtypes, divergences)]"""
    if mode == "tiny":
        return [(4, 333, [torch.bfloat16, torch.float32], ["forward_kl", "jsd"])]
    if mode == "full":
        return [(n, v, ALL_DTYPES, list(fastkd.DIVERGENCES)) for n, v in ((8, 1000), (8, 32001), (4, 128256))]
    return [(8, 1000, ALL_DTYPES, ["forward_kl", "jsd"]), (4, 128256, [torch.bfloat16], list(fastkd.DIVERGENCES)),
            (4, 128256, [torch.float32], ["forward_kl"])]


def close(got, want, tol):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got.isnan(), want.isnan()):
        return False, "NaN in other places"
    ok = ~want.isnan()
    err = (got[ok] - want[ok]).abs().max().item() if ok.any() else 0.0
    scale = want[ok].abs().max().item() if ok.any() else 0.0
    return err <= tol * max(scale, 1.0), f"max|err| {err:.3g} (scale {scale:.3g})"


def grad_of(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backends", help="comma list, e.g. triton,cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    dev = a.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    avail = fastkd.available_backends()
    print(f"torch {torch.__version__}, fastkd {fastkd.__version__}, backends {avail}", flush=True)
    failures = 0

    def case(name, fn):
        nonlocal failures
        t0 = time.time()
        try:
            ok, msg = fn()
            sync()
            print(f"{'PASS' if ok else 'FAIL'} {name}: {msg} [{time.time() - t0:.1f}s]", flush=True)
            failures += not ok
        except Exception as e:  # noqa: BLE001 -- every case reports, whatever it raises
            failures += 1
            text = "".join(traceback.format_exception_only(type(e), e)).strip()[:1500]
            print(f"ERROR {name}: {text} [{time.time() - t0:.1f}s]", flush=True)
            if "CUDA error" in text or "illegal" in text:
                print("  (a CUDA error poisons the context: later cases of this process may fail with it)", flush=True)

    for backend in a.backends.split(","):
        if backend not in avail:
            print(f"SKIP {backend}: not available ({avail})", flush=True)
            continue
        for n, v, dtypes, divergences in plan("tiny" if a.tiny else "full" if a.full else "default"):
            for dt in dtypes:
                g = torch.Generator().manual_seed(v)
                s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dt)
                t = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dt)
                labels = torch.randint(0, v, (n,), generator=g)
                labels[::3] = -100
                sd, td, ld = s.to(dev), t.to(dev), labels.to(dev)
                tag = f"{backend} V={v} {str(dt)[6:]}"
                tol = TOL[dt]
                for div in divergences:
                    def dense(div=div):
                        opts = dict(temperature=2.0, divergence=div, hard_weight=0.1, reduction="none")
                        wl, wg = grad_of(fastkd.kd_loss, s, t, labels=labels, backend="torch", **opts)
                        gl, gg = grad_of(fastkd.kd_loss, sd, td, labels=ld, backend=backend, **opts)
                        (ok1, m1), (ok2, m2) = close(gl, wl, tol), close(gg, wg, tol)
                        return ok1 and ok2, f"loss {m1}; grad {m2}"
                    case(f"dense_kd {div} {tag}", dense)
                teacher = fastkd.topk_teacher(t, k=64, temperature=2.0, backend="torch")

                def topk():
                    got = fastkd.topk_teacher(td, k=64, temperature=2.0, backend=backend)
                    (ok1, m1), (ok2, m2) = close(got.logprobs, teacher.logprobs, 1e-4), \
                        close(got.tail_logmass, teacher.tail_logmass, 1e-3)
                    return ok1 and ok2, f"logprobs {m1}; tail {m2}"
                case(f"topk_teacher k=64 {tag}", topk)
                for tail in ("bucket", "renorm_teacher", "renorm_both"):
                    def sparse(tail=tail):
                        moved = fastkd.SparseTeacher(*(f.to(dev) for f in teacher[:3]), teacher.temperature,
                                                     teacher.kind)
                        opts = dict(tail=tail, hard_weight=0.1, reduction="none")
                        wl, wg = grad_of(fastkd.sparse_kd_loss, s, teacher, labels=labels, backend="torch", **opts)
                        gl, gg = grad_of(fastkd.sparse_kd_loss, sd, moved, labels=ld, backend=backend, **opts)
                        (ok1, m1), (ok2, m2) = close(gl, wl, tol), close(gg, wg, tol)
                        return ok1 and ok2, f"loss {m1}; grad {m2}"
                    case(f"sparse_kd {tail} {tag}", sparse)

                def sample():
                    drawn = fastkd.sample_teacher(td, 16, 2.0, generator=torch.Generator(dev).manual_seed(1),
                                                  backend=backend)
                    ids, lp = drawn.indices.cpu(), drawn.logprobs.cpu().double()
                    mass = torch.where(lp > float("-inf"), lp.exp(), 0.0).sum(-1)
                    ok = bool(((ids >= 0) & (ids < v)).all()) and not lp.isnan().any() and \
                        bool(((mass - 1).abs() < 1e-6).all())
                    return ok, f"ids in [0, V) and counts summing to 1: {ok}"
                case(f"sample_teacher S=16 {tag}", sample)
    print(f"smoke: {failures} failing case(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The fused linear loss's 16-bit weight gradient against float64, and the call's peak memory growth
(issue: the chunk loop's G^T h_c product was rounded to 16 bits before its fp32 sum, and each chunk
allocated new logits). N = 4096 rows, H = 256, V = 32000, forward KL at T = 1, chunk 512 rows.

    PYTHONPATH=. python benchmarks/fused_linear_precision.py [--out FILE.json]

Prints, per dtype: max |grad_w - grad_w_fp64| / max |grad_w_fp64|, the same in Frobenius norm, and
the peak growth (MB, RSS
high-water mark of a child process running one forward + backward, Linux's /proc), the float64
reference run on the 16-bit inputs' own values."""
import argparse
import json
import multiprocessing as mp

import torch

N, H, V, CHUNK = 4096, 256, 32000, 512


def _inputs(dtype, exact=False):
    """The inputs in `dtype` (exact: those same values, in float64 -- the reference sees what the
    16-bit call sees, so the error is the computation's, not the inputs' rounding)."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, H, generator=g) / H ** 0.5)
    w = torch.randn(V, H, generator=g)
    th = torch.randn(N, H, generator=g) / H ** 0.5
    tw = torch.randn(V, H, generator=g)
    return [x.to(dtype).to(torch.float64) if exact else x.to(dtype) for x in (h, w, th, tw)]


def _grad_w(dtype, exact=False):
    import fastkd

    h, w, th, tw = _inputs(dtype, exact)
    w.requires_grad_()
    fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=CHUNK).backward()
    return w.grad


def _peak(dtype, queue):
    import fastkd

    h, w, th, tw = _inputs(dtype)
    w.requires_grad_()
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # (resets VmHWM to the current RSS)
        f.write("5")
    fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=CHUNK).backward()
    queue.put((status("VmHWM:") - before) / 1024)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        exact = _grad_w(dtype, exact=True)
        got = _grad_w(dtype).double()
        err = float((got - exact).abs().max() / exact.abs().max())
        norm_err = float((got - exact).norm() / exact.norm())
        q = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_peak, args=(dtype, q))
        proc.start()
        peak = q.get()
        proc.join()
        result[name] = {"grad_w_max_rel_err": err, "grad_w_norm_rel_err": norm_err, "peak_growth_mb": peak}
        print(f"{name}: grad_w vs fp64: max rel err {err:.3e}, norm rel err {norm_err:.3e}; peak growth {peak:.0f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

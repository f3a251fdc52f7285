"""GPU benchmark: fastkd's GPU backends against naive PyTorch, torch.compile and Liger-Kernel.

    python benchmarks/gpu_bench.py --output benchmarks/results/gpu-<device>.md   (make gpu-check runs it)

For each dtype (bf16, fp32), BT in {1024, 8192} and V in {32000, 128256, 256000}: fwd+bwd time of
forward KL at T = 2 (median of CUDA-event timings after warm-up), peak memory growth over the
inputs (torch.cuda.max_memory_allocated, in units of the gradient's size), the bytes the fused
kernel must move (two reads of student and teacher and one write of the gradient for dense; two
reads of the student and one write for sparse) and the fraction of the device's copy bandwidth
that achieves (measured here: a device-to-device copy, bytes read plus written), and the same
fraction counting one read of each input and one write -- the floor of a single-pass kernel, the
measure of the CUDA backend's targets (docs/backends.md). Rows: fastkd on
every available GPU backend, the naive loss eager and compiled, Liger's KL and JSD (each with the
log-softmax it needs) when liger_kernel imports; sparse (k = 64) and topk_teacher against
torch.topk + logsumexp.
"""
import argparse
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout built in place
import fastkd  # noqa: E402

TEMPERATURE = 2.0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_ms(fn, warmup=3, repeats=10):
    """Median milliseconds of fn() over `repeats` CUDA-event timings after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read plus written."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * src.nbytes / (ms * 1e-3)


def naive(s, t):
    lq = F.log_softmax(s.float() / TEMPERATURE, -1)
    lp = F.log_softmax(t.float() / TEMPERATURE, -1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean") * TEMPERATURE**2


def dense_impls(backends):
    impls = {f"fastkd-{b}": (lambda b: lambda s, t: fastkd.kd_loss(s, t, temperature=TEMPERATURE, backend=b))(b)
             for b in backends}
    impls["eager"] = naive
    impls["compiled"] = torch.compile(naive, dynamic=False)
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        kl, jsd = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerJSD(beta=0.5)
        impls["liger-kl"] = lambda s, t: kl(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE,
                                                                                              -1)) * TEMPERATURE**2
        impls["liger-jsd"] = lambda s, t: jsd(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1))
    except ImportError as e:
        print(f"liger_kernel not importable ({e}): no Liger rows", file=sys.stderr)
    return impls


def step(loss_fn, s, t):
    x = s.detach().requires_grad_(True)

    def run():
        x.grad = None
        loss_fn(x, t).backward()

    return run


def measure(run, grad_bytes):
    """(median ms, peak memory growth / grad_bytes) of run(); (None, None) when it runs out of
    memory, ("error", message) when it raises anything else (the other rows still run)."""
    try:
        ms = time_ms(run)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / grad_bytes
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    except Exception as e:  # noqa: BLE001 -- a broken implementation is a row, not the end of the run
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write the markdown table here")
    parser.add_argument("--bt", default="1024,8192")
    parser.add_argument("--vocab", default="32000,128256,256000")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--skip-fused-linear", action="store_true")
    parser.add_argument("--backends", default=None,
                        help="fastkd's GPU backends to time (default: every available one of triton, cuda)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")
    gpu_backends = [b for b in fastkd.available_backends() if b in ("triton", "cuda")]
    if args.backends is not None:
        wanted = [b for b in args.backends.split(",") if b]
        unknown = [b for b in wanted if b not in gpu_backends]
        if unknown:
            raise SystemExit(f"--backends: {unknown} not among the available GPU backends {gpu_backends}")
        gpu_backends = wanted
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name()
    lines = [f"# GPU benchmark: {name}", "",
             f"torch {torch.__version__}, fastkd {fastkd.__version__}, backends {fastkd.available_backends()}; "
             f"measured copy bandwidth {bw / 1e12:.2f} TB/s (device-to-device, read + write). "
             f"Forward KL, T = {TEMPERATURE}, fwd+bwd, median of 10 after 3 warm-up calls. "
             "'x grad' is peak memory growth over the inputs in units of the gradient; "
             "'% copy BW' is the bytes a two-pass kernel moves over the time, against the copy bandwidth; "
             "'% at 1 read' counts one read of each input and one write (the single-pass floor).",
             "", "| op | dtype | BT | V | impl | ms | x grad | GB moved | % copy BW | % at 1 read |", "|" + "---|" * 10]
    dense = dense_impls(gpu_backends)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for bt in map(int, args.bt.split(",")):
            for vocab in map(int, args.vocab.split(",")):
                g = torch.Generator(device="cuda").manual_seed(0)
                try:
                    s = (torch.randn(bt, vocab, device="cuda", generator=g) * 2).to(dtype)
                    t = (torch.randn(bt, vocab, device="cuda", generator=g) * 2).to(dtype)
                except torch.cuda.OutOfMemoryError:
                    continue
                es, grad_bytes = s.element_size(), s.numel() * s.element_size()
                moved = 5 * s.numel() * es  # dense: 2 reads of s and t, 1 write of grad
                for impl, fn in dense.items():
                    ms, peak = measure(step(fn, s, t), grad_bytes)
                    lines.append(_row("dense", dname, bt, vocab, impl, ms, peak, moved, bw, 3 * s.numel() * es))
                teacher = fastkd.topk_teacher(t, k=64, temperature=TEMPERATURE, backend="torch")
                for b in gpu_backends:
                    fn = (lambda b: lambda x, _t: fastkd.sparse_kd_loss(x, teacher, backend=b))(b)
                    ms, peak = measure(step(fn, s, t), grad_bytes)
                    lines.append(_row("sparse k=64", dname, bt, vocab, f"fastkd-{b}", ms, peak, 3 * s.numel() * es, bw,
                                      2 * s.numel() * es))
                    ms = _try(lambda: time_ms(lambda: fastkd.topk_teacher(t, k=64, temperature=TEMPERATURE, backend=b)))
                    lines.append(_row("topk_teacher k=64", dname, bt, vocab, f"fastkd-{b}", ms, None,
                                      2 * s.numel() * es, bw, s.numel() * es))
                ms = _try(lambda: time_ms(lambda: _torch_topk(t)))
                lines.append(_row("topk_teacher k=64", dname, bt, vocab, "torch.topk+logsumexp", ms, None,
                                  2 * s.numel() * es, bw, s.numel() * es))
                print(lines[-1], flush=True)
                s = t = teacher = None  # (freed before the next shape's)
                torch.cuda.empty_cache()
    if not args.skip_fused_linear:
        lines += fused_linear_rows(bw)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


def fused_linear_rows(bw, bt=8192, hidden=4096, vocab=128256, dtype=torch.bfloat16):
    """Fused linear KD fwd+bwd (hidden states + LM heads, bf16) against materialising the logits
    + fastkd / the naive loss, and Liger's fused-linear JSD when it imports; the achieved TFLOP/s
    of the three GEMMs (logits, grad_hidden, grad_weight: 6 BT H V flops) against the same three
    GEMMs timed alone."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(bt, hidden, device="cuda", generator=g, dtype=dtype) / hidden**0.5
    w = torch.randn(vocab, hidden, device="cuda", generator=g, dtype=dtype) * 0.02
    th = torch.randn(bt, hidden, device="cuda", generator=g, dtype=dtype) / hidden**0.5
    tw = torch.randn(vocab, hidden, device="cuda", generator=g, dtype=dtype) * 0.02
    flops = 6 * bt * hidden * vocab
    out = []

    def gemms():
        z = h @ w.T
        _ = z @ w
        _ = z.T @ h

    ms_gemm = _try(lambda: time_ms(gemms))
    ms_gemm = None if ms_gemm == "error" else ms_gemm
    impls = {
        "fastkd fused": lambda x, y: fastkd.fused_linear_kd_loss(x, y, teacher_hidden=th, teacher_weight=tw,
                                                                  temperature=TEMPERATURE),
        "materialised+fastkd": lambda x, y: fastkd.kd_loss(x @ y.T, (th @ tw.T).detach(), temperature=TEMPERATURE),
        "materialised+naive": lambda x, y: naive(x @ y.T, (th @ tw.T).detach()),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=TEMPERATURE)
        impls["liger fused-linear JSD"] = lambda x, y: liger(x, y, th, tw)
    except ImportError:
        pass
    for name, fn in impls.items():
        x, y = h.detach().requires_grad_(True), w.detach().requires_grad_(True)

        def run():
            x.grad = y.grad = None
            fn(x, y).backward()

        ms, peak = measure(run, x.numel() * x.element_size() + y.numel() * y.element_size())
        if ms == "error":
            out.append(f"| {name} | error: {peak} | - | - |")
            continue
        tflops = "-" if ms is None else f"{flops / (ms * 1e-3) / 1e12:.0f}"
        cell_ms, cell_peak = "OOM" if ms is None else f"{ms:.2f}", "-" if peak is None else f"{peak:.2f}"
        out.append(f"| {name} | {cell_ms} | {cell_peak} | {tflops} |")
    head = [f"\n## Fused linear KD, BT = {bt}, H = {hidden}, V = {vocab}, {str(dtype)[6:]}\n",
            "The three GEMMs alone: "
            f"{'OOM' if ms_gemm is None else f'{ms_gemm:.2f} ms, {flops / (ms_gemm * 1e-3) / 1e12:.0f} TFLOP/s'}. "
            "'x inputs' is peak memory growth in units of the hidden states + the head.\n",
            "| impl | ms | x inputs | TFLOP/s (6 BT H V flops) |", "|---|---|---|---|"]
    return head + out


def _torch_topk(t):
    b = t.float() / TEMPERATURE
    vals, ids = b.topk(64, -1)
    return ids, vals - b.logsumexp(-1, keepdim=True)


def _try(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception as e:  # noqa: BLE001 -- as in measure()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return "error"


def _row(op, dtype, bt, vocab, impl, ms, peak, moved, bw, floor):
    """floor: the bytes of one read of each input and one write of the output (issue 9's measure)."""
    if ms is None:
        return f"| {op} | {dtype} | {bt} | {vocab} | {impl} | OOM | - | - | - | - |"
    if ms == "error":
        return f"| {op} | {dtype} | {bt} | {vocab} | {impl} | error | {peak or '-'} | - | - | - |"
    frac, frac_floor = moved / (ms * 1e-3) / bw, floor / (ms * 1e-3) / bw
    return (f"| {op} | {dtype} | {bt} | {vocab} | {impl} | {ms:.3f} | "
            f"{'-' if peak is None else f'{peak:.2f}'} | {moved / 1e9:.2f} | {100 * frac:.0f}% | "
            f"{100 * frac_floor:.0f}% |")


if __name__ == "__main__":
    sys.exit(main())

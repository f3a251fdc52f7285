"""What a vocab-parallel step sends and costs (fastkd.distributed), measured: W processes on gloo
(file:// rendezvous, this machine only; one thread each), each with an even slice of the
vocabulary; every collective is wrapped, its bytes counted and its time taken
(tests/distributed_cases.py's Counted). Prints a markdown table:

    .venv/bin/python benchmarks/vocab_parallel.py --world 2 --rows 2048 --vocab 128256
    python benchmarks/vocab_parallel.py --backend nccl --world 8 --rows 8192   # one GPU per process

Bytes are this rank's payload per step (forward + backward): an all-reduce of b bytes sends about
2 (W - 1) / W * b on a ring. "comm (s)" is the time inside the collectives (waiting for the other
ranks included); "compute (s)" the rest of the step; "same slice, unsharded (s)" the same loss on
this rank's slice alone, without vocab_shard (the backend's plain kernel on [N, V / W]), so
"compute / unsharded" is what the partial forms cost over the plain kernel on the same data. The
last column is what one all-gather of the logits would move instead. Times are medians of 3.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _cases(n, vocab, cols, shard, device):
    import fastkd

    torch.set_default_device(device)
    g = torch.Generator(device).manual_seed(0)
    s = torch.randn(n, vocab, generator=g)[:, cols].contiguous()
    t = torch.randn(n, vocab, generator=g)[:, cols].contiguous()
    labels = torch.randint(0, vocab, (n,), generator=g)
    full_t = torch.randn(n, 64, generator=g)
    teacher = fastkd.topk_teacher(torch.cat([full_t, torch.full((n, vocab - 64), -30.0)], -1), 64)
    hid = 256
    h = torch.randn(n, hid, generator=g)
    w = (torch.randn(vocab, hid, generator=g) * 0.05)[cols].contiguous()

    # (unsharded on the slice: labels and teacher ids of other slices are moved into this one, so
    # the plain kernels accept them; the work is the same)
    local_labels = labels % (cols.stop - cols.start)
    local_teacher = teacher._replace(indices=teacher.indices % (cols.stop - cols.start))
    lab, sparse = (labels, teacher) if shard is not None else (local_labels, local_teacher)

    def dense_fkl():
        x = s.clone().requires_grad_()
        fastkd.kd_loss(x, t, vocab_shard=shard).backward()

    def dense_jsd_hard():
        x = s.clone().requires_grad_()
        fastkd.kd_loss(x, t, divergence="jsd", labels=lab, hard_weight=0.1, vocab_shard=shard).backward()

    def sparse_bucket():
        x = s.clone().requires_grad_()
        fastkd.sparse_kd_loss(x, sparse, vocab_shard=shard).backward()

    def fused_sparse():
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        fastkd.fused_linear_kd_loss(a, b, teacher=sparse, vocab_shard=shard).backward()

    return {"kd_loss forward_kl": dense_fkl, "kd_loss jsd + hard labels": dense_jsd_hard,
            "sparse_kd_loss top-64 bucket": sparse_bucket, "fused_linear_kd_loss top-64 (H=256)": fused_sparse}


def _worker(rank, world, rendezvous, shapes, out, backend):
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    from distributed_cases import Counted
    from fastkd.distributed import VocabShard

    torch.set_num_threads(1)  # (W processes share the machine)
    counted = Counted()
    shard = VocabShard()
    rows = []

    def timed(step):
        """(median seconds of 3 runs after a warm-up, median seconds in collectives, calls of the last)."""
        step()
        runs = []
        for _ in range(3):
            counted.take()
            dist.barrier()
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device != "cpu":
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0, counted.seconds))
            calls = counted.take()
        runs.sort()
        return runs[1][0], runs[1][1], calls

    for n, vocab in shapes:
        per = vocab // world
        cols = slice(rank * per, vocab if rank == world - 1 else (rank + 1) * per)
        plain = _cases(n, vocab, cols, None, device)
        for name, step in _cases(n, vocab, cols, shard, device).items():
            elapsed, comm, calls = timed(step)
            alone, _, _ = timed(plain[name])
            total = sum(b for _, b in calls)
            rows.append((name, n, vocab, len(calls), total, total / n, elapsed, comm, alone, n * vocab * 4))
    if rank == 0:
        with open(out, "w") as f:
            f.write("| loss | N | V | collectives | bytes / step | bytes / row | step (s) | comm (s) | compute (s) "
                    "| same slice, unsharded (s) | compute / unsharded | the [N, V] fp32 logits |\n")
            f.write("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
            for name, n, vocab, k, total, per_row, elapsed, comm, alone, gather in rows:
                f.write(f"| {name} | {n} | {vocab} | {k} | {total:,} | {per_row:.0f} | {elapsed:.2f} | {comm:.2f} | "
                        f"{elapsed - comm:.2f} | {alone:.2f} | {(elapsed - comm) / alone:.2f} | {gather:,} |\n")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one CUDA device per process")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", default="128256", help="comma-separated vocabulary sizes")
    args = p.parse_args()
    shapes = [(args.rows, int(v)) for v in args.vocab.split(",")]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "table.md")
        mp.spawn(_worker, args=(args.world, os.path.join(d, "rendezvous"), shapes, out, args.backend),
                 nprocs=args.world)
        import fastkd

        which = {op: fastkd.backends.resolve(op, "auto", torch.device("cuda" if args.backend == "nccl" else "cpu"))
                 for op in ("dense_kd_stats", "dense_kd", "sparse_kd")}
        print(f"{args.backend}, {args.world} processes, torch {torch.__version__}, fp32 logits, forward + backward; "
              f"backends {which}")
        print()
        print(open(out).read(), end="")


if __name__ == "__main__":
    main()

"""What a vocab-parallel step sends (fastkd.distributed), measured: W processes on gloo (file://
rendezvous, this machine only), each with an even slice of the vocabulary; every collective is
wrapped and its bytes counted (tests/distributed_cases.py's Counted). Prints a markdown table:

    .venv/bin/python benchmarks/vocab_parallel.py --world 2 --rows 1024 --vocab 32000,128256
    python benchmarks/vocab_parallel.py --backend nccl --world 8 --rows 8192   # one GPU per process

Bytes are this rank's payload per step (forward + backward): an all-reduce of b bytes sends about
2 (W - 1) / W * b on a ring. The last column is what one all-gather of the logits would be instead.
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

    def dense_fkl():
        x = s.clone().requires_grad_()
        fastkd.kd_loss(x, t, vocab_shard=shard).backward()

    def dense_jsd_hard():
        x = s.clone().requires_grad_()
        fastkd.kd_loss(x, t, divergence="jsd", labels=labels, hard_weight=0.1, vocab_shard=shard).backward()

    def sparse_bucket():
        x = s.clone().requires_grad_()
        fastkd.sparse_kd_loss(x, teacher, vocab_shard=shard).backward()

    def fused_sparse():
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        fastkd.fused_linear_kd_loss(a, b, teacher=teacher, vocab_shard=shard).backward()

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

    counted = Counted()
    shard = VocabShard()
    rows = []
    for n, vocab in shapes:
        per = vocab // world
        cols = slice(rank * per, vocab if rank == world - 1 else (rank + 1) * per)
        for name, step in _cases(n, vocab, cols, shard, device).items():
            step()  # warm-up
            counted.take()
            dist.barrier()
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            calls = counted.take()
            total = sum(b for _, b in calls)
            rows.append((name, n, vocab, len(calls), total, total / n, elapsed, n * vocab * 4))
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"| loss | N | V | collectives | bytes / step | bytes / row | step (s) | the [N, V] fp32 logits |\n")
            f.write("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
            for name, n, vocab, k, total, per_row, elapsed, gather in rows:
                f.write(f"| {name} | {n} | {vocab} | {k} | {total:,} | {per_row:.0f} | {elapsed:.2f} | {gather:,} |\n")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one CUDA device per process")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", default="32000,128256", help="comma-separated vocabulary sizes")
    args = p.parse_args()
    shapes = [(args.rows, int(v)) for v in args.vocab.split(",")]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "table.md")
        mp.spawn(_worker, args=(args.world, os.path.join(d, "rendezvous"), shapes, out, args.backend),
                 nprocs=args.world)
        print(f"{args.backend}, {args.world} processes, torch {torch.__version__}, fp32 logits, forward + backward")
        print()
        print(open(out).read(), end="")


if __name__ == "__main__":
    main()

"""Vocab-parallel losses (fastkd.distributed) on gloo, in 2 and 3 spawned processes with uneven
slices (one of them empty), against the unsharded loss in the same run: every divergence, the
sparse tails, fused linear, padded heads, explicit layouts, errors raised on every rank, and the
bytes each step sends (tests/distributed_cases.py)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases
from samples import PARTIAL_OPS, SAMPLES
import fastkd
from fastkd.distributed import VocabShard

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
slow = pytest.mark.slow  # (the spawned gloo processes)


@slow
@pytest.mark.parametrize("sizes", [(13, 20), (17, 0, 12)], ids=["2-ranks", "3-ranks-one-empty"])
def test_sharded_equals_unsharded(sizes, tmp_path):
    report = tmp_path / "bytes"
    mp.spawn(distributed_cases.run, args=(len(sizes), str(tmp_path / "rendezvous"), list(sizes), str(report)),
             nprocs=len(sizes))
    per_row = {float((tmp_path / f"bytes.{r}").read_text()) for r in range(len(sizes))}
    assert per_row == {13 * 8.0}  # dense, jsd with hard labels: 13 float64 per row, on every rank


@slow
@pytest.mark.skipif("triton" not in fastkd.available_backends(), reason="needs triton (TRITON_INTERPRET=1 on CPU)")
def test_sharded_on_triton_equals_unsharded(tmp_path):
    """The partial forms on backend triton (its interpreter here; compiled by make triton-check) in
    the sharded dense and sparse losses over 3 ranks, one with an empty slice: every divergence,
    fp32/bf16, edge rows, every tail."""
    sizes = (17, 0, 12)
    mp.spawn(distributed_cases.run_backend, args=(len(sizes), str(tmp_path / "rendezvous"), list(sizes), "triton"),
             nprocs=len(sizes))


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        VocabShard()


@pytest.mark.parametrize("kwargs, match", [(dict(start=3), "both start and total"),
                                           (dict(start=-1, total=4), "start must be a non-negative int"),
                                           (dict(start=5, total=4), "past total")])
def test_bad_layout_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VocabShard(**kwargs)


def test_vocab_shard_must_be_a_vocab_shard():
    x = torch.zeros(2, 5)
    with pytest.raises(TypeError, match="vocab_shard must be a fastkd.distributed.VocabShard"):
        fastkd.kd_loss(x, x, vocab_shard="tp")


@pytest.mark.parametrize("op", PARTIAL_OPS)
def test_partial_form_ops(op):
    """The partial-form ops (backend torch; the dispatch-table walk covers the others once they
    exist) against their fakes and schemas, on every sample, finite where the inputs are."""
    fn = getattr(torch.ops.fastkd, f"{op}_torch")
    for name, args in SAMPLES[op]():
        torch.library.opcheck(fn, args)
        out = fn(*args)
        out = args[0] if out is None else out  # (dense_kd_finish writes grad in place)
        for x in (out if isinstance(out, tuple) else (out,)):
            if name != "masked" and x.numel():
                assert not x[:, :2].isnan().any(), (op, name)


@pytest.mark.parametrize("backend",
                         [b for b in fastkd.available_backends() if b in fastkd.backends.OPS["dense_kd_finish"]])
def test_finish_refuses_a_grad_it_cannot_write_in_place(backend):
    from fastkd import backends

    grad, s, row, temperature, w = SAMPLES["dense_kd_finish"]()[0][1]
    strided = grad.t().contiguous().t()  # the same values, column-major
    backends.register("dense_kd_finish", backend)
    fn = getattr(torch.ops.fastkd, backends.qualname("dense_kd_finish", backend))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        fn(strided, s, row, temperature, w)
    fn(grad, s, row, temperature, w)
    assert not torch.equal(grad, SAMPLES["dense_kd_finish"]()[0][1][0])  # written in place


@slow
def test_tensor_parallel_example_runs_as_documented():
    """examples/tensor_parallel.py under torchrun (2 gloo processes, a deadline): the fused loss of a
    DTensor head, the loss of its DTensor logits and that of plain slices with a VocabShard agree,
    and the student learns."""
    import os
    import pathlib
    import re
    import socket
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "examples/tensor_parallel.py"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [[float(v) for v in re.findall(r"(?:fused|logits|slices) (\S+)", line)]
            for line in r.stdout.splitlines() if line.startswith("step")]
    assert len(rows) == 3 and all(len(row) == 3 for row in rows), r.stdout
    for row in rows:
        assert max(row) - min(row) <= 2e-6 * max(row), row
    assert rows[-1][0] < 0.6 * rows[0][0]

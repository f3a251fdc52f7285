"""fastkd.hf under the launcher users start it with: torchrun, 2 processes over gloo on the CPU,
gradient accumulation -- the losses and the final parameters equal one process's on the same
global batches: the DistillationTrainer under DDP (it crashed at the first step:
'DistributedDataParallel' object has no attribute 'get_output_embeddings') and DeepSpeed ZeRO-3,
and causal_lm_kd_loss with an FSDP2 (fully_shard) student; on a GPU (make gpu-report), the Trainer's
own FSDP2. Plain SGD as well as AdamW: Adam's normalisation would hide a constant factor in the
gradient. Every run has a deadline."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASE = ROOT / "tests" / "hf_ddp_case.py"
FSDP2_CASE = ROOT / "tests" / "fsdp2_case.py"
pytestmark = pytest.mark.slow  # every test here starts torchrun
DEADLINE = 300  # seconds a run may take, start-up of both processes included


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ONE_PROCESS = {}  # (case, optimizer, engine) -> the one-process run, which every engine's test compares with


def _one(tmp_path, optimizer, case=CASE, engine="ddp"):
    if (case, optimizer, engine) not in _ONE_PROCESS:
        (tmp_path / "one").mkdir()
        (_ONE_PROCESS[case, optimizer, engine],) = _run(tmp_path / "one", optimizer, 1, case, engine)
    return _ONE_PROCESS[case, optimizer, engine]


def _run(out, optimizer, world, case=CASE, engine="ddp"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable] if world == 1 and engine != "fsdp" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
        str(_free_port())]
    r = subprocess.run(launcher + [str(case), str(out), optimizer] + ([engine] if case == CASE else []),
                       capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=DEADLINE)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return [torch.load(out / f"result-{rank}.pt") for rank in range(world)]


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
def test_trainer_equals_one_process(tmp_path, optimizer, engine):
    """DDP, and DeepSpeed ZeRO-3 (every parameter partitioned; the head's weight is empty outside
    its module's forward, which fastkd.hf now runs inside) -- each with the variants of
    hf_ddp_case (no labels column; a labels column, whose count the Trainer gathers over the ranks:
    the gradient was 1 / world of the right one; average_tokens_across_devices off; prompt /
    completion rows of uneven lengths, packed and counted in get_batch_samples)."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    (tmp_path / "ddp").mkdir()
    one = _one(tmp_path, optimizer)
    ranks = _run(tmp_path / "ddp", optimizer, 2, engine=engine)
    assert set(one) == {"plain", "labels", "no_average", "prompts"}
    for variant in one:
        assert len(one[variant]["losses"]) == 4 and all(r[variant]["world"] == 2 for r in ranks)
        _assert_same_as_one(one[variant], [r[variant] for r in ranks], optimizer, variant)
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r[variant]["split"]), torch.tensor(one[variant]["split"]),
                                       rtol=1e-5, atol=1e-6, msg=variant)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fully_shard_equals_one_process(tmp_path, optimizer):
    """FSDP2: the student sharded with fully_shard (each decoder layer and the root; the head's
    weight is then gathered by the root for the forward, and fastkd.hf takes it as the forward saw
    it), a plain loop with gradient accumulation -- the losses and parameters of one process."""
    (tmp_path / "fsdp2").mkdir()
    one = _one(tmp_path, optimizer, FSDP2_CASE)
    ranks = _run(tmp_path / "fsdp2", optimizer, 2, FSDP2_CASE)
    _assert_same_as_one(one, ranks, optimizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: accelerate selects FSDP only "
                    "for GPUs (on a CPU the Trainer wraps the model in DDP instead); make gpu-report runs it")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
def test_trainer_fsdp_equals_one_process(tmp_path, optimizer):
    """The Trainer's own FSDP2 (fsdp="full_shard auto_wrap", each decoder layer a unit; torchrun, the
    device's GPUs, at most 2) against one process on one GPU: the losses and the parameters."""
    world = min(torch.cuda.device_count(), 2)
    one = _one(tmp_path, optimizer, engine="cuda")
    (tmp_path / "fsdp").mkdir()
    ranks = _run(tmp_path / "fsdp", optimizer, world, engine="fsdp")
    for variant in one:
        _assert_same_as_one(one[variant], [r[variant] for r in ranks], optimizer, variant)


def _assert_same_as_one(one, ranks, optimizer, what=""):
    """Every rank's logged losses and final parameters equal the one-process run's, which trained.
    SGD: the sums of two ranks' gradients round unlike one process's, ~1e-9. Adam divides each step
    by sqrt(v), which turns those roundings into ~1e-5 of its O(lr) steps; SGD keeps the check that
    a constant factor in the gradient (which Adam's normalisation hides) is absent. (Adam's atol is
    2e-4: an element whose second moment is tiny moves by up to ~7e-5 under the two orders of
    summation; the defect this guards against, a gradient off by the world size, moved AdamW's
    parameters by 9.1e-3.)"""
    start = _initial_params()
    assert max((one["params"][k] - start[k]).abs().max() for k in start) > 1e-4  # it trained
    tol = dict(rtol=1e-5, atol=1e-7) if optimizer == "sgd" else dict(rtol=1e-4, atol=2e-4)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}: {m}")
        for name, p in one["params"].items():
            torch.testing.assert_close(r["params"][name], p, **tol, msg=lambda m, n=name: f"{what} {n}: {m}")


def _initial_params():
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_ddp_case

    return {k: v.detach().clone() for k, v in hf_ddp_case.model(0, 32).state_dict().items()}

"""A few steps of distillation of a tiny Llama student sharded with FSDP2 (`fully_shard` on each
decoder layer and on the root) through fastkd.hf.causal_lm_kd_loss, as tests/test_hf_ddp.py starts
it: under torchrun (gloo, CPU) or as one process without FSDP, on the same global batches, with
gradient accumulation.

    torchrun --nproc_per_node 2 tests/fsdp2_case.py OUT OPTIMIZER     (or: python tests/fsdp2_case.py ...)

Writes OUT/result-<rank>.pt: the global loss of each step and the student's final parameters.
(The Hugging Face Trainer's own FSDP needs a GPU: accelerate selects FSDP only for GPU-like
devices, and on the CPU wraps the model in DDP -- `make gpu-report` runs that case.)
"""
import os
import sys

import torch
import torch.distributed as dist

from hf_ddp_case import ACCUM, GLOBAL_MICRO, STEPS, Tokens, leave, model
import fastkd.hf


def main(out, optimizer):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    student, teacher = model(0, 32), model(1, 48)
    teacher.eval().requires_grad_(False)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)
    opt = (torch.optim.SGD(student.parameters(), lr=0.05) if optimizer == "sgd"
           else torch.optim.AdamW(student.parameters(), lr=0.05, weight_decay=0.0))
    ids = Tokens().ids
    per_rank = GLOBAL_MICRO // world
    losses = []
    for step in range(STEPS):
        window = ids[step * ACCUM * GLOBAL_MICRO:(step + 1) * ACCUM * GLOBAL_MICRO]
        kept = window.shape[0] * (window.shape[1] - 1)  # the window's kept positions, all ranks together
        total = torch.zeros(())
        for micro in range(ACCUM):
            rows = window[micro * GLOBAL_MICRO:(micro + 1) * GLOBAL_MICRO][rank * per_rank:(rank + 1) * per_rank]
            loss = fastkd.hf.causal_lm_kd_loss(student, rows, teacher_model=teacher, temperature=2.0,
                                               hard_weight=0.25, num_items_in_batch=kept)
            # FSDP2 averages the ranks' gradients; the loss is a sum over all ranks' rows: times world
            (loss * world).backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total))
        opt.step()
        opt.zero_grad()
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
              for k, v in student.state_dict().items()}
    torch.save({"losses": losses, "params": params, "world": world}, os.path.join(out, f"result-{rank}.pt"))
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

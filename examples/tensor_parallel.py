"""Distillation with the LM head split over the vocabulary (tensor parallelism), three ways that
give the same loss: DTensor logits, a DTensor head through the fused loss, and plain slices with a
VocabShard. A tiny student (an embedding and a head) learns a fixed teacher's next-token
distribution; no rank ever holds a whole row of logits in the fused form.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py          (gloo on CPUs, NCCL on GPUs)
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fastkd
from fastkd.distributed import VocabShard

V, H, N = 1000, 64, 256  # vocabulary, hidden size, tokens per step

device = "cuda" if torch.cuda.is_available() else "cpu"
dist.init_process_group("nccl" if device == "cuda" else "gloo")
rank = dist.get_rank()
if device == "cuda":
    torch.cuda.set_device(rank % torch.cuda.device_count())
mesh = init_device_mesh(device, (dist.get_world_size(),))

torch.manual_seed(0)  # the same initial weights on every rank
embed = torch.nn.Embedding(V, H).to(device)  # the student's "backbone", replicated
head = torch.nn.Linear(H, V, bias=False).to(device)  # the LM head, split over the vocabulary
teacher_embed, teacher_head = torch.nn.Embedding(V, 2 * H).to(device), torch.nn.Linear(2 * H, V).to(device)
plan = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)  # logits: DTensors sharded on V
parallelize_module(head, mesh, plan)
parallelize_module(teacher_head, mesh, plan)
optimizer = torch.optim.AdamW([*embed.parameters(), *head.parameters()], lr=1e-2)

for step in range(41):
    tokens = torch.randint(0, V, (N,), device=device, generator=torch.Generator(device).manual_seed(step))
    hidden = embed(tokens)
    with torch.no_grad():
        teacher_hidden = teacher_embed(tokens)
        teacher_logits = teacher_head(teacher_hidden)  # a DTensor [N, V], Shard(-1)
    # the fused form: the head's weight is a DTensor [V, H] sharded on V; no [N, V] logits
    loss = fastkd.fused_linear_kd_loss(hidden, head.weight, teacher_hidden=teacher_hidden,
                                       teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
                                       temperature=2.0)
    if step % 20 == 0:
        with torch.no_grad():  # the same loss from the DTensor logits, and from plain slices
            logits = head(hidden)  # a DTensor [N, V], Shard(-1)
            from_logits = fastkd.kd_loss(logits, teacher_logits, temperature=2.0)
            from_slices = fastkd.kd_loss(logits.to_local(), teacher_logits.to_local(), temperature=2.0,
                                         vocab_shard=VocabShard())
        if rank == 0:
            print(f"step {step:2d}  fused {loss.full_tensor().item():.6f}  "
                  f"logits {from_logits.full_tensor().item():.6f}  slices {from_slices.item():.6f}")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
dist.destroy_process_group()

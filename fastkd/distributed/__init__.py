"""Vocab-parallel losses over torch.distributed: each rank holds the logits (or the LM-head rows) of
a contiguous slice [start, start + V_r) of a vocabulary of `total` ids -- Megatron-style tensor
parallelism -- and gets the exact loss of the whole rows and its own slice of the gradient, while
only a few numbers per row cross the network (docs/distributed.md). The package: shard.py (VocabShard and
its agreement), losses.py (the three sharded losses), rows.py (the row math of steps 1-3),
dtensor.py (DTensor placements).

    shard = fastkd.distributed.VocabShard()          # slices in rank order, from their sizes
    loss = fastkd.kd_loss(student_slice, teacher_slice, vocab_shard=shard, temperature=2.0)

Per call, on N rows (the collectives are torch.distributed's, NCCL or gloo; the kernels are the
backend's partial forms -- ops dense_kd_stats / dense_kd_shard, sparse_kd_stats / sparse_kd_shard):

    0. agree    all_gather of HEADER (8 int64 per rank): row counts, slice sizes and positions,
                a hash of the options and a checksum of the labels and sparse-teacher ids (which
                every rank must pass alike); a bad argument on any rank is raised on every rank
    1. stats    the slice's row maxima and sums of exponentials -> all_reduce MAX of [N, 3],
                then all_reduce SUM of [N, 7 (dense) | 6 (sparse)] rescaled sums and flags
    2. shares   the slice's shares of the row sums (dense: D, U; sparse: sum over its ids) and the
                label's logit where the label lies in the slice -> all_reduce SUM of [N, 3 | 2]
    3. grad     the slice's gradient from the whole row's statistics (no communication)

All float64: 13 numbers (104 bytes) per row for the dense loss, 11 (88 bytes) for the sparse one.
The agreement runs on the CPU when the process group has a CPU backend (gloo; torch's default
group has one beside NCCL), so reading it costs no device sync. With check=False it runs whole
only on the first call; later calls all-reduce just (N, -N), so a rank passing another N is an
error on every rank, not a collective of mismatched sizes.
"""
from .dtensor import dtensor_heads, dtensor_rows, replicated
from .losses import fused_linear_kd_loss, fused_row_op, kd_loss, sparse_kd_loss, used_columns
from .shard import HEADER, Layout, VocabShard, check_shard, refused

__all__ = ["VocabShard", "Layout", "HEADER", "kd_loss", "sparse_kd_loss", "fused_linear_kd_loss", "dtensor_rows",
           "dtensor_heads", "replicated", "used_columns", "fused_row_op", "check_shard", "refused"]

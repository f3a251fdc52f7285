"""Every fastkd op schema, in one list (the torchao way), with its one fake (shapes only).

Each op has one schema and one implementation per backend (the table in fastkd/backends.py): the
compiled backends register theirs under the op's name with TORCH_LIBRARY_IMPL (csrc/cpu/,
kernels/), the Python ones are the ops `<op>_torch` and `<op>_triton` with the same schema. The
units of every argument are documented in docs/math.md and docs/backends.md.
"""
import torch

from . import backends
from ._autograd import register_autograd
from ._math import DENSE_STATS, SPARSE_STATS, row_loss_outputs

SCHEMAS = {
    # Dense KD, one row per leading index: student/teacher [N, V] of one float dtype, labels [N]
    # int64 or None. Returns (loss [N] fp32 (fp64 for fp64 input), grad [N, V] in the student's
    # dtype (fp32 for fp16: _math.grad_dtype) -- grad_scale * d loss[i] / d student[i] -- or an
    # empty tensor when compute_grad is false). grad_scale is the reduction's weight (1 / kept rows for "mean"), applied in the
    # kernel so that a plain loss.backward() has nothing left to scale.
    "dense_kd": "(Tensor student, Tensor teacher, Tensor? labels, str divergence, float temperature, "
                "float beta, int ignore_index, float hard_weight, bool scale_by_t2, float grad_scale, "
                "bool compute_grad) -> (Tensor, Tensor)",
    # Forward KL against a sparse teacher: student [N, V]; indices [N, k] int64 token ids;
    # logprobs [N, k] fp32 log p_T of those ids (-inf: padding); tail_logmass [N] fp32 log of
    # the teacher's mass outside the ids (-inf: none); tail "bucket" | "renorm_teacher" |
    # "renorm_both". Returns (loss [N], grad [N, V]) like dense_kd.
    "sparse_kd": "(Tensor student, Tensor indices, Tensor logprobs, Tensor tail_logmass, Tensor? labels, "
                 "str tail, float temperature, int ignore_index, float hard_weight, bool scale_by_t2, "
                 "float grad_scale, bool compute_grad) -> (Tensor, Tensor)",
    # Top-k compression of a teacher: logits [N, V] (any float dtype) at temperature T ->
    # (indices [N, k] int64, largest first; logprobs [N, k] fp32; tail_logmass [N] fp32).
    "topk_teacher": "(Tensor logits, int k, float temperature) -> (Tensor, Tensor, Tensor)",
    # Draws for sampled KD by inverse CDF: logits [N, V]; uniforms [N, S] fp64, each row
    # ascending in [0, 1) -> draws [N, S] int64 token ids, ascending (-1: row with no finite logit).
    "sample_teacher_draws": "(Tensor logits, Tensor uniforms, float temperature) -> Tensor",
    # Vocab-parallel partial forms (fastkd.distributed; columns in fastkd/_math.py, docs/distributed.md).
    # Each takes one rank's slice [N, V_slice] of the vocabulary; teacher ids and labels are
    # given less the slice's start (ids outside [0, V_slice) belong to other slices).
    # dense_kd_stats -> [N, 8] float64 partial statistics (DENSE_STATS).
    "dense_kd_stats": "(Tensor student, Tensor teacher, float temperature, bool hard) -> Tensor",
    # dense_kd_shard: row_stats [N, 8] float64 (DENSE_ROW, the whole row's) -> (parts [N, 2]
    # float64: the slice's shares of D and U; grad [N, V_slice] like dense_kd's, or empty).
    "dense_kd_shard": "(Tensor student, Tensor teacher, Tensor? labels, Tensor row_stats, str divergence, "
                      "float temperature, float beta, int ignore_index, float hard_weight, bool scale_by_t2, "
                      "float grad_scale, bool compute_grad) -> (Tensor, Tensor)",
    # sparse_kd_stats: indices [N, k] int64, logprobs [N, k] fp32 -> [N, 6] float64 (SPARSE_STATS).
    "sparse_kd_stats": "(Tensor student, Tensor indices, Tensor logprobs, float temperature, bool hard) -> Tensor",
    # sparse_kd_shard: row_stats [N, 8] float64 (SPARSE_ROW) -> grad [N, V_slice] like sparse_kd's.
    "sparse_kd_shard": "(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, Tensor row_stats, "
                       "float temperature, int ignore_index, float hard_weight, bool scale_by_t2, "
                       "float grad_scale) -> Tensor",
    # The teacher cache's decoders (docs/cache-format.md). unpack_bits: values [start, stop) of
    # a uint8 stream of `width`-bit values, LSB first -> int64 [stop - start]. unpack_monotone:
    # bitmap [n, B] uint8 holding `count` non-decreasing values per row (a one at bit c_i + i)
    # -> int64 [n, count].
    "unpack_bits": "(Tensor stream, int width, int start, int stop) -> Tensor",
    "unpack_monotone": "(Tensor bitmap, int count) -> Tensor",
}


def _row_loss_fake(student, *args):
    """dense_kd and sparse_kd: (loss [N], grad [N, V] or empty); compute_grad is the last argument."""
    return row_loss_outputs(student, args[-1])


def _topk_fake(logits, k, temperature):
    n = logits.shape[0]
    return (logits.new_empty(n, k, dtype=torch.long), logits.new_empty(n, k, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32))


def _stats_fake(student, *args, columns):
    return student.new_empty(student.shape[0], columns, dtype=torch.float64)


FAKES = {
    "dense_kd": _row_loss_fake,
    "sparse_kd": _row_loss_fake,
    "topk_teacher": _topk_fake,
    "sample_teacher_draws": lambda logits, uniforms, temperature: uniforms.new_empty(uniforms.shape, dtype=torch.long),
    "dense_kd_stats": lambda *args: _stats_fake(*args, columns=len(DENSE_STATS)),
    "dense_kd_shard": lambda student, *args: (_stats_fake(student, columns=2), row_loss_outputs(student, args[-1])[1]),
    "sparse_kd_stats": lambda *args: _stats_fake(*args, columns=len(SPARSE_STATS)),
    "sparse_kd_shard": lambda student, *args: row_loss_outputs(student, True)[1],
    "unpack_bits": lambda stream, width, start, stop: stream.new_empty(stop - start, dtype=torch.long),
    "unpack_monotone": lambda bitmap, count: bitmap.new_empty(bitmap.shape[0], count, dtype=torch.long),
}
ROW_LOSS_OPS = ("dense_kd", "sparse_kd")  # differentiable: the kept-gradient autograd (_autograd.py)

LIB = torch.library.Library("fastkd", "DEF")
for _op, _backends in backends.OPS.items():
    for _name in sorted({backends.qualname(_op, b) for b in _backends + ("cuda",)}):
        LIB.define(_name + SCHEMAS[_op])
        torch.library.register_fake(f"fastkd::{_name}")(FAKES[_op])
        if _op in ROW_LOSS_OPS:
            register_autograd(_name)
for _op, _backends in backends.OPS.items():
    backends.register(_op, "torch")

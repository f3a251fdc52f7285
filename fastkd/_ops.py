"""The op registry: every fastkd op's schema, in one list (the torchao way), with its one fake
(shapes only); the dtype policy of their outputs and the column layouts of the vocab-parallel
partial forms, which every backend follows; and define_ops(), which declares them all.

Each op has one schema and one implementation per backend (the table in fastkd/backends.py): the
compiled backends register theirs under the op's name with TORCH_LIBRARY_IMPL (csrc/cpu/,
kernels/), the Python ones are the ops `<op>_torch` and `<op>_triton` with the same schema. The
units of every argument are documented in docs/math.md and docs/backends.md.
"""
import torch

def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a fused op's kept gradient for logits of `dtype`: the logits' own, but fp32 for
    fp16, whose range cannot hold the gradient with the reduction's 1/N folded in (nor GradScaler's
    factor of 2^16 and more); backward applies the whole scale in fp32, then casts once."""
    return torch.float32 if dtype == torch.float16 else dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a logits dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_loss_outputs(student: torch.Tensor, compute_grad: bool):
    """The uninitialised outputs of a row-loss op (dense_kd, sparse_kd) on student [N, V]: loss [N]
    in acc_dtype, and grad [N, V] contiguous in grad_dtype (or an empty tensor without compute_grad)."""
    loss = student.new_empty(student.shape[0], dtype=acc_dtype(student.dtype))
    grad = (torch.empty(student.shape, dtype=grad_dtype(student.dtype), device=student.device)
            if compute_grad else student.new_empty(0))
    return loss, grad


# Vocab-parallel partial forms (fastkd.distributed, docs/distributed.md): the columns of the
# [N, k] float64 row tensors that pass between a rank's kernels and the all-reduces.
#   dense_kd_stats -> DENSE_STATS of the rank's slice: maxima m and sums exp(x - m) of a = s/T,
#       b = t/T and s (temperature 1, for hard labels), r = close_row_sum's share (0 for a far
#       slice: the row is then far, and r unused), far (0 or 1).
#   dense_kd_shard <- DENSE_ROW, the whole row's: maxima M and log sums log S (lse = M + log S),
#       dl = lse(b) - lse(a) by the close-row rule, u = sum u (0 until known; forward KL: -1);
#       NaN in any column marks a row that read a NaN or +inf somewhere.
#   sparse_kd_stats -> SPARSE_STATS of the slice: (m, sum exp(a - m)) over the slice's ids of I,
#       over its other ids, and of s at temperature 1.
#   sparse_kd_shard <- SPARSE_ROW: the row's TailCoef fields the gradient uses, lse_all and
#       lse_tail, and lse of s at temperature 1.
DENSE_STATS = ("m_a", "s_a", "r_a", "far", "m_b", "s_b", "m_1", "s_1")
DENSE_ROW = ("m_a", "log_s_a", "m_b", "log_s_b", "dl", "m_1", "log_s_1", "u")
SPARSE_STATS = ("m_in", "s_in", "m_out", "s_out", "m_1", "s_1")
SPARSE_ROW = ("shift", "in_scale", "in_norm", "out_scale", "lse_all", "tail_scale", "lse_tail", "lse_1")


SCHEMAS = {
    # Dense KD, one row per leading index: student/teacher [N, V] of one float dtype, labels [N]
    # int64 or None. Returns (loss [N] fp32 (fp64 for fp64 input), grad [N, V] in the student's
    # dtype (fp32 for fp16: grad_dtype) -- grad_scale * d loss[i] / d student[i] -- or an
    # empty tensor when compute_grad is false). grad_scale is the reduction's weight (1 / kept rows
    # for "mean"), applied in the kernel so that a plain loss.backward() has nothing left to scale.
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
    # Vocab-parallel partial forms (fastkd.distributed; columns below, docs/distributed.md).
    # Each takes one rank's slice [N, V_slice] of the vocabulary; teacher ids and labels are
    # given less the slice's start (ids outside [0, V_slice) belong to other slices).
    # dense_kd_stats -> [N, 8] float64 partial statistics (DENSE_STATS).
    "dense_kd_stats": "(Tensor student, Tensor teacher, float temperature, bool hard) -> Tensor",
    # dense_kd_shard: row_stats [N, 8] float64 (DENSE_ROW, the whole row's) -> (parts [N, 2]
    # float64: the slice's shares of D and U; grad [N, V_slice] like dense_kd's, or empty).
    "dense_kd_shard": "(Tensor student, Tensor teacher, Tensor? labels, Tensor row_stats, str divergence, "
                      "float temperature, float beta, int ignore_index, float hard_weight, bool scale_by_t2, "
                      "float grad_scale, bool compute_grad) -> (Tensor, Tensor)",
    # dense_kd_finish: grad [N, V_slice] (dense_kd_shard's with U = 0, contiguous), student, row_stats
    # [N, 8] float64 (DENSE_ROW with U): grad -= kd_grad_weight gradient_u(U) q, in place (a new
    # [N, V] output would cost its page faults: as much as the pass itself on the CPU).
    "dense_kd_finish": "(Tensor(a!) grad, Tensor student, Tensor row_stats, float temperature, "
                       "float kd_grad_weight) -> ()",
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
    "dense_kd_finish": lambda grad, *args: None,
    "sparse_kd_stats": lambda *args: _stats_fake(*args, columns=len(SPARSE_STATS)),
    "sparse_kd_shard": lambda student, *args: row_loss_outputs(student, True)[1],
    "unpack_bits": lambda stream, width, start, stop: stream.new_empty(stop - start, dtype=torch.long),
    "unpack_monotone": lambda bitmap, count: bitmap.new_empty(bitmap.shape[0], count, dtype=torch.long),
}
ROW_LOSS_OPS = ("dense_kd", "sparse_kd")  # differentiable: the kept-gradient autograd (_autograd.py)

LIB = None


def define_ops():
    """Declare every op of fastkd/backends.py's table (once): its schema and fake, the kept-gradient
    autograd of the row-loss ops, and the torch backend's implementations. fastkd/__init__.py calls
    it before fastkd._C loads, whose TORCH_LIBRARY_IMPLs need the schemas."""
    global LIB
    if LIB is not None:
        return
    from . import backends
    from ._autograd import register_autograd

    LIB = torch.library.Library("fastkd", "DEF")
    for op, impls in backends.OPS.items():
        for name in sorted({backends.qualname(op, b) for b in impls + ("cuda",)}):
            LIB.define(name + SCHEMAS[op])
            torch.library.register_fake(f"fastkd::{name}")(FAKES[op])
            if op in ROW_LOSS_OPS:
                register_autograd(name)
    for op in backends.OPS:
        backends.register(op, "torch")

"""Every fastkd op schema, in one list (the torchao way).

Each op has one schema and one implementation per backend: the compiled ones register theirs with
TORCH_LIBRARY_IMPL (csrc/cpu/, kernels/), the pure-PyTorch ones in fastkd/reference.py. The shapes
and units of every argument are documented in docs/math.md.
"""
import torch

_DENSE_ARGS = (
    "Tensor student, Tensor teacher, Tensor? labels, str divergence, float temperature, "
    "float beta, int ignore_index, float hard_weight, bool scale_by_t2, float grad_scale, "
    "bool compute_grad"
)

_SPARSE_ARGS = (
    "Tensor student, Tensor indices, Tensor logprobs, Tensor tail_logmass, Tensor? labels, "
    "str tail, float temperature, int ignore_index, float hard_weight, bool scale_by_t2, "
    "float grad_scale, bool compute_grad"
)

SCHEMAS = {
    # Dense KD, one row per leading index: student/teacher [N, V] of one float dtype, labels [N]
    # int64 or None. Returns (loss [N] fp32 (fp64 for fp64 input), grad [N, V] in the student's
    # dtype -- grad_scale * d loss[i] / d student[i] -- or an empty tensor when compute_grad is
    # false). grad_scale is the reduction's weight (1 / kept rows for "mean"), applied in the
    # kernel so that a plain loss.backward() has nothing left to scale.
    "dense_kd": f"dense_kd({_DENSE_ARGS}) -> (Tensor, Tensor)",  # compiled: CPU (C++), CUDA
    "dense_kd_torch": f"dense_kd_torch({_DENSE_ARGS}) -> (Tensor, Tensor)",  # pure PyTorch
    # Forward KL against a sparse teacher: student [N, V]; indices [N, k] int64 token ids;
    # logprobs [N, k] fp32 log p_T of those ids (-inf: padding); tail_logmass [N] fp32 log of
    # the teacher's mass outside the ids (-inf: none); tail "bucket" | "renorm_teacher" |
    # "renorm_both". Returns (loss [N], grad [N, V]) like dense_kd.
    "sparse_kd": f"sparse_kd({_SPARSE_ARGS}) -> (Tensor, Tensor)",  # compiled: CPU (C++)
    "sparse_kd_torch": f"sparse_kd_torch({_SPARSE_ARGS}) -> (Tensor, Tensor)",  # pure PyTorch
    # Top-k compression of a teacher: logits [N, V] (any float dtype) at temperature T ->
    # (indices [N, k] int64, largest first; logprobs [N, k] fp32; tail_logmass [N] fp32).
    "topk_teacher": "topk_teacher(Tensor logits, int k, float temperature) -> (Tensor, Tensor, Tensor)",
    "topk_teacher_torch": "topk_teacher_torch(Tensor logits, int k, float temperature) -> (Tensor, Tensor, Tensor)",
    # Draws for sampled KD by inverse CDF: logits [N, V]; uniforms [N, S] fp64, each row
    # ascending in [0, 1) -> draws [N, S] int64 token ids, ascending (-1: row with no finite logit).
    "sample_teacher_draws": "sample_teacher_draws(Tensor logits, Tensor uniforms, float temperature) -> Tensor",
    "sample_teacher_draws_torch": "sample_teacher_draws_torch(Tensor logits, Tensor uniforms, float temperature) -> Tensor",
    # The teacher cache's decoders (docs/cache-format.md). unpack_bits: values [start, stop) of
    # a uint8 stream of `width`-bit values, LSB first -> int64 [stop - start]. unpack_monotone:
    # bitmap [n, B] uint8 holding `count` non-decreasing values per row (a one at bit c_i + i)
    # -> int64 [n, count].
    "unpack_bits": "unpack_bits(Tensor stream, int width, int start, int stop) -> Tensor",
    "unpack_bits_torch": "unpack_bits_torch(Tensor stream, int width, int start, int stop) -> Tensor",
    "unpack_monotone": "unpack_monotone(Tensor bitmap, int count) -> Tensor",
    "unpack_monotone_torch": "unpack_monotone_torch(Tensor bitmap, int count) -> Tensor",
}

LIB = torch.library.Library("fastkd", "DEF")
for _schema in SCHEMAS.values():
    LIB.define(_schema)

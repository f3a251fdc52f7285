// The ops' tensor arguments, checked once for every compiled backend (csrc/cpu/, csrc/cuda/):
// shapes, dtypes, option values, and the outputs allocated on the inputs' device.
// fastkd/_op_checks.py is the twin for the Python backends. Checks that read values (labels,
// teacher ids, uniforms) live with the CPU ops; on CUDA the kernels make such a row NaN instead.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "kd_math.h"
#include "sparse_math.h"

namespace fastkd {

// What every row-loss op (dense_kd, sparse_kd) takes and returns, validated by prepare_row_loss.
// student: [N, V] contiguous; labels: [N] int64 or undefined. Outputs: loss [N] (float, or double
// for double inputs) and, when compute_grad, grad [N, V] in the student's dtype (zero at ignored
// rows), scaled by grad_scale; float for a Half student (fastkd/_ops.py grad_dtype).
struct RowLossArgs {
  at::Tensor student, labels;
  at::Tensor loss, grad;
  double temperature, hard_weight, grad_scale;
  int64_t ignore_index;
  bool scale_by_t2, compute_grad;
};

// One call of the dense KD op: teacher [N, V] contiguous, the student's dtype.
struct DenseArgs : RowLossArgs {
  at::Tensor teacher;
  Divergence divergence;
  double beta;
};

// One call of the sparse-teacher KD op: indices [N, k] int64; logprobs [N, k] float (-inf:
// padding); tail_logmass [N] float, all contiguous; tail: sparse_math.h.
struct SparseArgs : RowLossArgs {
  at::Tensor indices, logprobs, tail_logmass;
  Tail tail;
};

// One call of topk_teacher: logits [N, V] contiguous; outputs indices [N, k] int64 (largest
// first), logprobs [N, k] float32, tail_logmass [N] float32.
struct TopkArgs {
  at::Tensor logits, indices, logprobs, tail_logmass;
  int64_t k;
  double temperature;
};

// One call of sample_teacher's draws: logits [N, V]; uniforms [N, S] float64, each row ascending
// in [0, 1); output draws [N, S] int64, ascending ids (-1 for a row with no finite logit).
struct SampleArgs {
  at::Tensor logits, uniforms, draws;
  double temperature;
};

// The vocab-parallel dense loss's partial forms (fastkd/_ops.py: DENSE_STATS, DENSE_ROW), on one
// rank's slice [N, V_slice]. dense_kd_stats: out [N, 8] float64. dense_kd_shard: labels are the
// slice's ids (any int64: others lie in other slices), row_stats [N, 8] float64 the whole row's,
// parts [N, 2] float64 the slice's shares of D and U (the loss output `loss` goes unused).
struct DenseStatsArgs {
  at::Tensor student, teacher, out;
  double temperature;
  bool hard;
};
struct DenseShardArgs : DenseArgs {
  at::Tensor row_stats, parts;
};

// dense_kd_finish: grad [N, V_slice] (dense_kd_shard's, with U = 0) in the student's gradient
// dtype, contiguous, finished in place; row_stats [N, 8] float64 (DENSE_ROW with U).
struct DenseFinishArgs {
  at::Tensor grad, student, row_stats;
  double temperature, kd_grad_weight;
};

// The vocab-parallel sparse loss's partial forms (SPARSE_STATS, SPARSE_ROW): indices [N, k] int64
// (this slice's ids: others lie in other slices), logprobs [N, k] float32. sparse_kd_stats: out
// [N, 6] float64. sparse_kd_shard: labels the slice's ids, row_stats [N, 8] float64, the
// gradient in `grad` (always computed).
struct SparseStatsArgs {
  at::Tensor student, indices, logprobs, out;
  double temperature;
  bool hard;
};
struct SparseShardArgs : RowLossArgs {
  at::Tensor indices, logprobs, row_stats;
};

// Each checks op `op`'s arguments and fills `a`, outputs allocated (uninitialised).
void prepare_dense(DenseArgs& a, const at::Tensor& student, const at::Tensor& teacher,
                   const std::optional<at::Tensor>& labels, std::string_view divergence, double temperature,
                   double beta, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
                   bool compute_grad);
void prepare_sparse(SparseArgs& a, const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, std::string_view tail,
                    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2,
                    double grad_scale, bool compute_grad);
void prepare_dense_stats(DenseStatsArgs& a, const at::Tensor& student, const at::Tensor& teacher, double temperature,
                         bool hard);
void prepare_dense_shard(DenseShardArgs& a, const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& row_stats,
                         std::string_view divergence, double temperature, double beta, int64_t ignore_index,
                         double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad);
void prepare_dense_finish(DenseFinishArgs& a, const at::Tensor& grad, const at::Tensor& student,
                          const at::Tensor& row_stats, double temperature, double kd_grad_weight);
void prepare_sparse_stats(SparseStatsArgs& a, const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& logprobs, double temperature, bool hard);
void prepare_sparse_shard(SparseShardArgs& a, const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                          const at::Tensor& row_stats, double temperature, int64_t ignore_index, double hard_weight,
                          bool scale_by_t2, double grad_scale);
void prepare_topk(TopkArgs& a, const at::Tensor& logits, int64_t k, double temperature);
void prepare_sample(SampleArgs& a, const at::Tensor& logits, const at::Tensor& uniforms, double temperature);

// An uninitialised contiguous tensor of `like`'s shape in `dtype`, whose pages the kernel will
// fault in as 2 MiB transparent huge pages where Linux allows it (CPU tensors): first-touching a
// fresh [N, V] gradient in 4 KiB pages costs more than computing it (about 40 ms vs 8 ms for
// 131 MB here).
at::Tensor empty_hugepage_like(const at::Tensor& like, at::ScalarType dtype);

}  // namespace fastkd

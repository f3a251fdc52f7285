// The compiled ops' argument checks and output allocation (declared in op_args.h).
#include "op_args.h"
#include "row_columns.h"

#include <ATen/ATen.h>

#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {

at::Tensor empty_hugepage_like(const at::Tensor& like, at::ScalarType dtype) {
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!out.is_cpu()) return out;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (last > first) {  // advice only: failure (THP off) just means 4 KiB pages
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

namespace {

// Checks the shared arguments of row-loss op `op` and fills `a`'s shared fields, outputs allocated.
void prepare_row_loss(RowLossArgs& a, const char* op, const at::Tensor& student,
                      const std::optional<at::Tensor>& labels, double temperature, int64_t ignore_index,
                      double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fastkd::", op, ": student must be [N, V], got ", student.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()),
              "fastkd::", op, ": logits must be floating point, got ", student.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
              "fastkd::", op, ": temperature must be positive and finite, got ", temperature);
  TORCH_CHECK_VALUE(hard_weight >= 0 && hard_weight <= 1,
              "fastkd::", op, ": hard_weight must lie in [0, 1], got ", hard_weight);
  const int64_t N = student.size(0);
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == N && labels->scalar_type() == at::kLong,
                "fastkd::", op, ": labels must be int64 [", N, "], got ", labels->scalar_type(), " ",
                labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student.device(), "fastkd::", op, ": labels on ", labels->device(),
                ", student on ", student.device());
    a.labels = labels->contiguous();
  }
  TORCH_CHECK_VALUE(hard_weight == 0 || labels.has_value(), "fastkd::", op, ": hard_weight > 0 needs labels");
  a.student = student.contiguous();
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.loss = at::empty({N}, student.options().dtype(acc));
  // the kept gradient: the student's dtype, float for Half (fastkd/_ops.py grad_dtype)
  const auto grad_type = student.scalar_type() == at::kHalf ? at::kFloat : student.scalar_type();
  a.grad = compute_grad ? empty_hugepage_like(a.student, grad_type) : at::empty({0}, student.options());
  a.temperature = temperature;
  a.hard_weight = hard_weight;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  a.scale_by_t2 = scale_by_t2;
  a.compute_grad = compute_grad;
}

void check_teacher_logits(const char* op, const at::Tensor& logits, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "fastkd::", op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "fastkd::", op, ": logits must be floating point");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
              "fastkd::", op, ": temperature must be positive and finite, got ", temperature);
}

}  // namespace

void prepare_dense(DenseArgs& a, const at::Tensor& student, const at::Tensor& teacher,
                   const std::optional<at::Tensor>& labels, std::string_view divergence, double temperature,
                   double beta, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
                   bool compute_grad) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "fastkd::dense_kd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "fastkd::dense_kd: student dtype ",
              student.scalar_type(), " != teacher dtype ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device(), "fastkd::dense_kd: student on ", student.device(),
              ", teacher on ", teacher.device());
  TORCH_CHECK_VALUE(divergence_from_name(divergence, &a.divergence), "fastkd::dense_kd: unknown divergence '",
              std::string(divergence), "'");
  prepare_row_loss(a, "dense_kd", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, compute_grad);
  if (a.divergence == Divergence::JSD) {
    TORCH_CHECK_VALUE(beta > 0 && beta < 1, "fastkd::dense_kd: beta must lie in (0, 1) for jsd, got ", beta);
  } else if (a.divergence == Divergence::SkewForwardKL || a.divergence == Divergence::SkewReverseKL) {
    TORCH_CHECK_VALUE(beta >= 0 && beta < 1, "fastkd::dense_kd: beta must lie in [0, 1) for ", std::string(divergence),
                ", got ", beta);
  }
  a.teacher = teacher.contiguous();
  a.beta = beta;
}

void prepare_sparse(SparseArgs& a, const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, std::string_view tail,
                    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2,
                    double grad_scale, bool compute_grad) {
  prepare_row_loss(a, "sparse_kd", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, compute_grad);
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == N && logprobs.sizes() == indices.sizes(),
              "fastkd::sparse_kd: indices and logprobs must be [", N, ", k]; got ", indices.sizes(),
              " and ", logprobs.sizes());
  TORCH_CHECK_VALUE(tail_logmass.dim() == 1 && tail_logmass.size(0) == N,
              "fastkd::sparse_kd: tail_logmass must be [", N, "], got ", tail_logmass.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong && logprobs.scalar_type() == at::kFloat &&
                  tail_logmass.scalar_type() == at::kFloat,
              "fastkd::sparse_kd: indices must be int64, logprobs and tail_logmass float32");
  TORCH_CHECK_VALUE(indices.device() == student.device() && logprobs.device() == student.device() &&
                  tail_logmass.device() == student.device(),
              "fastkd::sparse_kd: the teacher tensors must be on the student's device ", student.device());
  TORCH_CHECK_VALUE(tail_from_name(tail, &a.tail), "fastkd::sparse_kd: unknown tail '", std::string(tail), "'");
  TORCH_CHECK_VALUE(indices.size(1) >= 1, "fastkd::sparse_kd: a sparse teacher needs k >= 1 entries per row");
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  a.tail_logmass = tail_logmass.contiguous();
}

namespace {

void check_row_stats(const char* op, const at::Tensor& stats, int64_t n, int64_t k) {
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kDouble && stats.dim() == 2 && stats.size(0) == n && stats.size(1) == k,
                    "fastkd::", op, ": row_stats must be float64 [", n, ", ", k, "], got ", stats.scalar_type(), " ",
                    stats.sizes());
}

}  // namespace

void prepare_dense_stats(DenseStatsArgs& a, const at::Tensor& student, const at::Tensor& teacher, double temperature,
                         bool hard) {
  // (a row-loss op's checks and the dense pair's, with their messages: fastkd/_op_checks.py)
  RowLossArgs shared;
  prepare_row_loss(shared, "dense_kd_stats", student, std::nullopt, temperature, -100, 0.0, true, 1.0, false);
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "fastkd::dense_kd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "fastkd::dense_kd: student dtype ",
              student.scalar_type(), " != teacher dtype ", teacher.scalar_type());
  a.student = shared.student;
  a.teacher = teacher.contiguous();
  a.out = at::empty({student.size(0), columns::dense_stats::width}, student.options().dtype(at::kDouble));
  a.temperature = temperature;
  a.hard = hard;
}

void prepare_dense_shard(DenseShardArgs& a, const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& row_stats,
                         std::string_view divergence, double temperature, double beta, int64_t ignore_index,
                         double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  prepare_dense(a, student, teacher, labels, divergence, temperature, beta, ignore_index, hard_weight, scale_by_t2,
                grad_scale, compute_grad);
  check_row_stats("dense_kd_shard", row_stats, student.size(0), columns::dense_row::width);
  a.row_stats = row_stats.contiguous();
  a.parts = at::empty({student.size(0), 2}, student.options().dtype(at::kDouble));
}

void prepare_dense_finish(DenseFinishArgs& a, const at::Tensor& grad, const at::Tensor& student,
                          const at::Tensor& row_stats, double temperature, double kd_grad_weight) {
  RowLossArgs shared;
  prepare_row_loss(shared, "dense_kd_finish", student, std::nullopt, temperature, -100, 0.0, true, 1.0, false);
  const auto grad_type = student.scalar_type() == at::kHalf ? at::kFloat : student.scalar_type();
  TORCH_CHECK_VALUE(grad.sizes() == student.sizes() && grad.scalar_type() == grad_type, "fastkd::dense_kd_finish: grad "
                    "must be ", grad_type, " ", student.sizes(), " (the student's gradient), got ", grad.scalar_type(),
                    " ", grad.sizes());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "fastkd::dense_kd_finish: grad must be contiguous (it is finished in place)");
  check_row_stats("dense_kd_finish", row_stats, student.size(0), columns::dense_row::width);
  a.grad = grad;
  a.student = shared.student;
  a.row_stats = row_stats.contiguous();
  a.temperature = temperature;
  a.kd_grad_weight = kd_grad_weight;
}

namespace {

// A sparse teacher's rows on a vocab-parallel op: [N, k] int64 ids (any value) and float32 log-probs.
void check_shard_teacher(const char* op, const at::Tensor& student, const at::Tensor& indices,
                         const at::Tensor& logprobs) {
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == N && logprobs.sizes() == indices.sizes(), "fastkd::", op,
                    ": indices and logprobs must be [", N, ", k], got ", indices.sizes(), " and ", logprobs.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong && logprobs.scalar_type() == at::kFloat, "fastkd::", op,
                   ": indices must be int64, logprobs float32");
  TORCH_CHECK_VALUE(indices.device() == student.device() && logprobs.device() == student.device(), "fastkd::", op,
                    ": the teacher tensors must be on the student's device ", student.device());
}

}  // namespace

void prepare_sparse_stats(SparseStatsArgs& a, const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& logprobs, double temperature, bool hard) {
  RowLossArgs shared;
  prepare_row_loss(shared, "sparse_kd_stats", student, std::nullopt, temperature, -100, 0.0, true, 1.0, false);
  check_shard_teacher("sparse_kd_stats", student, indices, logprobs);
  a.student = shared.student;
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  a.out = at::empty({student.size(0), columns::sparse_stats::width}, student.options().dtype(at::kDouble));
  a.temperature = temperature;
  a.hard = hard;
}

void prepare_sparse_shard(SparseShardArgs& a, const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& logprobs, const std::optional<at::Tensor>& labels,
                          const at::Tensor& row_stats, double temperature, int64_t ignore_index, double hard_weight,
                          bool scale_by_t2, double grad_scale) {
  prepare_row_loss(a, "sparse_kd_shard", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, true);
  check_shard_teacher("sparse_kd_shard", student, indices, logprobs);
  check_row_stats("sparse_kd_shard", row_stats, student.size(0), columns::sparse_row::width);
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  a.row_stats = row_stats.contiguous();
}

void prepare_topk(TopkArgs& a, const at::Tensor& logits, int64_t k, double temperature) {
  check_teacher_logits("topk_teacher", logits, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "fastkd::topk_teacher: k must lie in [1, V=", V, "], got ", k);
  a.logits = logits.contiguous();
  a.indices = at::empty({N, k}, logits.options().dtype(at::kLong));
  a.logprobs = at::empty({N, k}, logits.options().dtype(at::kFloat));
  a.tail_logmass = at::empty({N}, logits.options().dtype(at::kFloat));
  a.k = k;
  a.temperature = temperature;
}

void prepare_sample(SampleArgs& a, const at::Tensor& logits, const at::Tensor& uniforms, double temperature) {
  check_teacher_logits("sample_teacher_draws", logits, temperature);
  const int64_t N = logits.size(0);
  TORCH_CHECK_VALUE(uniforms.dim() == 2 && uniforms.size(0) == N && uniforms.scalar_type() == at::kDouble,
              "fastkd::sample_teacher_draws: uniforms must be float64 [", N, ", S], got ",
              uniforms.scalar_type(), " ", uniforms.sizes());
  TORCH_CHECK_VALUE(uniforms.device() == logits.device(), "fastkd::sample_teacher_draws: uniforms on ",
              uniforms.device(), ", logits on ", logits.device());
  a.logits = logits.contiguous();
  a.uniforms = uniforms.contiguous();
  a.draws = at::empty(uniforms.sizes(), logits.options().dtype(at::kLong));
  a.temperature = temperature;
}

}  // namespace fastkd

// kernels/launch.h -- what the CUDA kernels take, and their host entry points.
//
// Plain C++ and CUDA runtime types only (no torch header): kernels/*.cu implement these entry
// points and nvcc alone compiles them (`make cuda-check`); the ATen launchers in csrc/cuda/ check
// the tensors, fill these structs with raw pointers and call them on the current stream.
// Shapes and units follow fastkd/_ops.py: rows [N, V] with a row stride in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_math.h"
#include "sparse_math.h"

namespace fastkd::cuda {

// The logits' element type. The accumulation type is float (double for Float64); the kept
// gradient is the logits' type, float for Float16 (fastkd/_ops.py grad_dtype).
enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

inline int dtype_bytes(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }
inline int grad_bytes(DType t) { return t == DType::Float16 ? 4 : dtype_bytes(t); }

// What both row losses take. student: [n, vocab], row stride stride_s elements; labels: [n] or
// null; loss: [n] float (double for Float64); grad: [n, vocab] contiguous, or null (not asked for).
struct RowLossParams {
  const void* student;
  int64_t stride_s;
  const int64_t* labels;
  void* loss;
  void* grad;
  int64_t n, vocab, ignore_index;
  RowWeights w;          // kd_math.h: the KD and hard-label weights, grad_scale folded in
  double inv_temperature;
  DType dtype;
  bool hard;             // hard_weight > 0 (labels given)
};

// The fields of p that follow from the loss's options: the weights, 1 / T, whether hard labels count.
inline void set_row_loss_options(RowLossParams& p, double temperature, double hard_weight, bool scale_by_t2,
                                 double grad_scale) {
  p.w = row_weights(temperature, hard_weight, scale_by_t2, grad_scale);
  p.inv_temperature = 1.0 / temperature;
  p.hard = hard_weight > 0;
}

// dense_kd: teacher [n, vocab] of the student's dtype, row stride stride_t.
struct DenseParams : RowLossParams {
  const void* teacher;
  int64_t stride_t;
  Divergence divergence;
  double beta;
};

// sparse_kd: indices [n, k] int64, logprobs [n, k] float (-inf: padding), tail_logmass [n] float,
// all contiguous.
struct SparseParams : RowLossParams {
  const int64_t* indices;
  const float* logprobs;
  const float* tail_logmass;
  int64_t k;
  Tail tail;
};

// topk_teacher: logits [n, vocab] (row stride stride) -> indices [n, k] int64 (largest first),
// logprobs [n, k] float, tail_logmass [n] float, all contiguous.
struct TopkParams {
  const void* logits;
  int64_t stride, n, vocab, k;
  double inv_temperature;
  DType dtype;
  int64_t* indices;
  float* logprobs;
  float* tail_logmass;
};

// sample_teacher_draws: logits [n, vocab] (row stride stride), uniforms [n, s] double ascending
// per row in [0, 1) -> draws [n, s] int64 ascending (-1: a row with no finite logit); contiguous.
struct SampleParams {
  const void* logits;
  int64_t stride, n, vocab, s;
  double inv_temperature;
  DType dtype;
  const double* uniforms;
  int64_t* draws;
};

// The largest k topk_teacher keeps on this backend (its bitonic sort of the kept entries runs in
// shared memory).
constexpr int64_t kMaxTopk = 1024;

// The entry points: each launches its kernel on `stream` and returns the launch's error.
cudaError_t dense_kd(const DenseParams& p, cudaStream_t stream);
cudaError_t sparse_kd(const SparseParams& p, cudaStream_t stream);
cudaError_t topk_teacher(const TopkParams& p, cudaStream_t stream);
cudaError_t sample_teacher_draws(const SampleParams& p, cudaStream_t stream);

}  // namespace fastkd::cuda

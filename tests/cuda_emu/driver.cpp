// C entry points over kernels/launch.h for tests/test_cuda_emulated.py: the kernels of kernels/*.cu,
// compiled for the CPU against include/cuda_emu.h, called through ctypes on CPU tensors.
#include "launch.h"

using namespace fastkd;
using namespace fastkd::cuda;

namespace {
void fill(RowLossParams& p, const void* s, const int64_t* labels, void* loss, void* grad, int64_t n, int64_t v,
          int dtype, double temperature, double hard_weight, int scale_by_t2, double grad_scale, int64_t ignore_index) {
  p.student = s;
  p.stride_s = v;
  p.labels = labels;
  p.loss = loss;
  p.grad = grad;
  p.n = n;
  p.vocab = v;
  p.ignore_index = ignore_index;
  p.dtype = DType(dtype);
  set_row_loss_options(p, temperature, hard_weight, scale_by_t2 != 0, grad_scale);
}
}  // namespace

extern "C" {

void emu_set_device(int device) { cuda_emu::device = device; }
unsigned long emu_clustered_blocks() { return cuda_emu::clustered_blocks; }
unsigned long emu_smem_overruns() { return cuda_emu::smem_overruns; }

int emu_dense_kd(const void* s, const void* t, const int64_t* labels, void* loss, void* grad, int64_t n, int64_t v,
                 int dtype, int divergence, double temperature, double beta, int64_t ignore_index, double hard_weight,
                 int scale_by_t2, double grad_scale) {
  DenseParams p;
  fill(p, s, labels, loss, grad, n, v, dtype, temperature, hard_weight, scale_by_t2, grad_scale, ignore_index);
  p.teacher = t;
  p.stride_t = v;
  p.divergence = Divergence(divergence);
  p.beta = beta;
  return dense_kd(p, nullptr);
}

int emu_sparse_kd(const void* s, const int64_t* indices, const float* logprobs, const float* tail_logmass,
                  const int64_t* labels, void* loss, void* grad, int64_t n, int64_t v, int64_t k, int dtype, int tail,
                  double temperature, int64_t ignore_index, double hard_weight, int scale_by_t2, double grad_scale) {
  SparseParams p;
  fill(p, s, labels, loss, grad, n, v, dtype, temperature, hard_weight, scale_by_t2, grad_scale, ignore_index);
  p.indices = indices;
  p.logprobs = logprobs;
  p.tail_logmass = tail_logmass;
  p.k = k;
  p.tail = Tail(tail);
  return sparse_kd(p, nullptr);
}

int emu_topk_teacher(const void* x, int64_t* indices, float* logprobs, float* tail, int64_t n, int64_t v, int64_t k,
                     int dtype, double temperature) {
  TopkParams p{x, v, n, v, k, 1.0 / temperature, DType(dtype), indices, logprobs, tail};
  return topk_teacher(p, nullptr);
}

int emu_sample_teacher_draws(const void* x, const double* uniforms, int64_t* draws, int64_t n, int64_t v, int64_t s,
                             int dtype, double temperature) {
  SampleParams p{x, v, n, v, s, 1.0 / temperature, DType(dtype), uniforms, draws};
  return sample_teacher_draws(p, nullptr);
}
}

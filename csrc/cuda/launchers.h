// What the ATen launchers of the CUDA kernels share (csrc/cuda/<op>.cpp): the dtype map, the
// row-loss parameters read off checked arguments (csrc/op_args.h), and the launch check. The
// kernels themselves (kernels/*.cu) see only the plain structs of kernels/launch.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "launch.h"
#include "op_args.h"

namespace fastkd::cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, "fastkd: the CUDA kernels take float32, float64, bfloat16 or float16 logits, got ", t);
  }
}

// The kernel's view of a checked row-loss call (outputs allocated on the student's device).
inline void fill_row_loss(RowLossParams& p, const RowLossArgs& a) {
  TORCH_CHECK(a.student.is_cuda(), "fastkd: backend 'cuda' runs on CUDA tensors; student is on ", a.student.device());
  p.student = a.student.const_data_ptr();
  p.stride_s = a.student.stride(0);
  p.labels = a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr;
  p.loss = a.loss.mutable_data_ptr();
  p.grad = a.compute_grad ? a.grad.mutable_data_ptr() : nullptr;
  p.n = a.student.size(0);
  p.vocab = a.student.size(1);
  p.ignore_index = a.ignore_index;
  p.dtype = dtype_of(a.student.scalar_type());
  set_row_loss_options(p, a.temperature, a.hard_weight, a.scale_by_t2, a.grad_scale);
}

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "fastkd::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

}  // namespace fastkd::cuda

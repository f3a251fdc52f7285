// The top-k teacher compression kernel for the CPU (fastkd.topk_teacher; the torch twin is
// fastkd/reference/topk_teacher.py). Included once per ISA by isa_<isa>.cpp.
//
// top-k, per row, one read of the row and one exp pass:
//   1. load + scale + max          A = t / T
//   2. select the k largest with a size-k min-heap; a vector compare against the heap's minimum
//      skips every block with no candidate, so almost the whole row costs one compare
//   3. exp + sum with the k ids masked to -inf: the tail's own sum (never Z - sum of the top k);
//      log p_i = a_i - log Z, tail log-mass = log(tail sum) - log Z, Z = tail sum + sum_I exp
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

// A min-heap of (value, id) on raw arrays (local code: no std:: template shared across ISA files).
struct MinHeap {
  float* val;
  int64_t* id;
  int64_t size;
  void sift_down(int64_t i) {
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= size) return;
      if (c + 1 < size && val[c + 1] < val[c]) ++c;
      if (!(val[c] < val[i])) return;
      std::swap(val[c], val[i]);
      std::swap(id[c], id[i]);
      i = c;
    }
  }
  void build() {
    for (int64_t i = size / 2 - 1; i >= 0; --i) sift_down(i);
  }
  void replace_min(float v, int64_t j) {
    val[0] = v;
    id[0] = j;
    sift_down(0);
  }
  // Heap sort in place: afterwards val[0:n] / id[0:n] run from the largest value down.
  void sort_descending() {
    for (int64_t n = size; n > 1; --n) {
      std::swap(val[0], val[n - 1]);
      std::swap(id[0], id[n - 1]);
      size = n - 1;
      sift_down(0);
    }
    size = 0;
  }
};

template <typename scalar_t>
void topk_rows(const TopkArgs& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t N = a.logits.size(0), V = a.logits.size(1), K = a.k;
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* T = a.logits.const_data_ptr<scalar_t>();
  int64_t* IDX = a.indices.mutable_data_ptr<int64_t>();
  float* LP = a.logprobs.mutable_data_ptr<float>();
  float* TAIL = a.tail_logmass.mutable_data_ptr<float>();
  const float inv_t = float(1.0 / a.temperature);
  constexpr int kNone = (1 << Vec::size()) - 1;

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> row(Vp + K);
    Scratch<int64_t> ids(K);
    float* A = row.data;
    float* hv = A + Vp;
    for (int64_t r = begin; r < end; ++r) {
      const float m = load_scaled(T + r * V, A, V, Vp, inv_t);
      int64_t* idx = IDX + r * K;
      float* lp = LP + r * K;
      MinHeap heap{hv, ids.data, K};
      for (int64_t j = 0; j < K; ++j) {
        hv[j] = A[j];
        ids.data[j] = j;
      }
      heap.build();
      int64_t j = K;
      for (; j < V && j % Vec::size(); ++j)
        if (A[j] > hv[0]) heap.replace_min(A[j], j);
      for (; j + Vec::size() <= V; j += Vec::size()) {
        // zero_mask(): one bit per lane that compares false; all set: no candidate in the block
        if ((Vec::loadu(A + j) > Vec(hv[0])).zero_mask() == kNone) continue;
        for (int64_t l = 0; l < Vec::size(); ++l)
          if (A[j + l] > hv[0]) heap.replace_min(A[j + l], j + l);
      }
      for (; j < V; ++j)
        if (A[j] > hv[0]) heap.replace_min(A[j], j);
      heap.sort_descending();
      const float* top = hv;
      for (int64_t c = 0; c < K; ++c) idx[c] = ids.data[c];
      if (m == kNegInf || std::isnan(m) || m == -kNegInf) {
        // no finite logit: every log-prob and the tail are -inf; a NaN or +inf logit (the max
        // carries both): every one is NaN (docs/math.md)
        const float v = m == kNegInf ? kNegInf : std::numeric_limits<float>::quiet_NaN();
        for (int64_t c = 0; c < K; ++c) lp[c] = v;
        TAIL[r] = v;
        continue;
      }
      double s_in = 0;
      for (int64_t c = 0; c < K; ++c) {
        A[idx[c]] = kNegInf;
        s_in += std::exp(double(top[c]) - double(m));
      }
      const double s_tail = exp_sum(A, A, Vp, m);
      const double log_z = double(m) + std::log(s_tail + s_in);
      for (int64_t c = 0; c < K; ++c) lp[c] = static_cast<float>(double(top[c]) - log_z);
      TAIL[r] = static_cast<float>(double(m) + std::log(s_tail) - log_z);
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(topk_teacher_rows, TopkArgs, logits, topk_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS

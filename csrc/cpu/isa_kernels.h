// The CPU kernels, listed once. FASTKD_CPU_KERNELS is every op's per-ISA row loop and its argument
// struct (csrc/op_args.h): kernels.h declares each for every ISA from it. Below it, the kernels'
// headers, which isa_<isa>.cpp compiles for its instruction set by including this file (after
// defining FASTKD_ISA_NS and ATen's CPU_CAPABILITY). A new CPU op adds one line to each list.
#ifndef FASTKD_CPU_KERNELS
#define FASTKD_CPU_KERNELS(X)                  \
  X(dense_kd_rows, DenseArgs)                  \
  X(dense_kd_stats_rows, DenseStatsArgs)       \
  X(dense_kd_shard_rows, DenseShardArgs)       \
  X(dense_kd_finish_rows, DenseFinishArgs)     \
  X(sparse_kd_rows, SparseArgs)                \
  X(sparse_kd_stats_rows, SparseStatsArgs)     \
  X(sparse_kd_shard_rows, SparseShardArgs)     \
  X(topk_teacher_rows, TopkArgs)               \
  X(sample_teacher_rows, SampleArgs)
#endif

#if defined(FASTKD_ISA_NS) && !defined(FASTKD_ISA_KERNELS_INCLUDED)  // (once: the headers include kernels.h)
#define FASTKD_ISA_KERNELS_INCLUDED
#include "dense_kd_kernel.h"
#include "dense_kd_stats_kernel.h"
#include "dense_kd_shard_kernel.h"
#include "dense_kd_finish_kernel.h"
#include "sparse_kd_kernel.h"
#include "sparse_kd_stats_kernel.h"
#include "sparse_kd_shard_kernel.h"
#include "topk_teacher_kernel.h"
#include "sample_teacher_draws_kernel.h"
#endif

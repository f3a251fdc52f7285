// Portable build of every CPU kernel (no vector extension assumed).
#define CPU_CAPABILITY DEFAULT
#define FASTKD_ISA_NS isa_default
#include "dense_kd_finish_kernel.h"
#include "dense_kd_kernel.h"
#include "dense_kd_shard_kernel.h"
#include "dense_kd_stats_kernel.h"
#include "sparse_kd_kernel.h"
#include "sparse_kd_shard_kernel.h"
#include "sparse_kd_stats_kernel.h"
#include "sample_teacher_draws_kernel.h"
#include "topk_teacher_kernel.h"

// Portable build of every CPU kernel (no vector extension assumed).
#define CPU_CAPABILITY DEFAULT
#define FASTKD_ISA_NS isa_default
#include "kd_loss_kernel.h"
#include "sparse_kd_kernel.h"
#include "teacher_kernel.h"

// Portable build of the CPU kernels (no vector extension assumed).
#define CPU_CAPABILITY DEFAULT
#define FASTKD_ISA_NS isa_default
#include "kd_loss_kernel.h"

// Portable build of every CPU kernel (no vector extension assumed).
#define CPU_CAPABILITY DEFAULT
#define FASTKD_ISA_NS isa_default
#include "isa_kernels.h"

// The CPU emulation of CUDA for tests/test_cuda_emulated.py: see cuda_emu.h.
#pragma once
#include "cuda_emu.h"

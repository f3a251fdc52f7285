"""Backend "triton": Triton kernels for CUDA tensors (and, under TRITON_INTERPRET=1, for CPU
tensors in Triton's interpreter, which is how CI tests them). One file per op; fastkd/backends.py
registers each file's function of the op's name as the op `<op>_triton`. The per-element and
per-row math is fastkd/triton/_math.py, the twin of csrc/kd_math.h and csrc/sparse_math.h; launch
shapes come from fastkd/triton/_config.py."""

# fastkd: `make test` and `make demo` each work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch (on this kind of machine it is read from local disk, no download).
TORCH_SPEC ?= torch==2.13.0
# Triton, pinned: docs/kernel-resources.md records what this version's compiler makes of every
# kernel (make triton-check). TRITON_OLD is the GPU machines' version (torch 2.11), which
# triton-check also compiles with, from a side directory (no interpreter runs there).
TRITON_SPEC ?= triton==3.9.0
TRITON_OLD ?= 3.6.0
TRITON_OLD_DIR := build/triton-$(TRITON_OLD)
# the linter, pinned so that `make lint` means the same on every machine (configured in pyproject.toml)
RUFF_SPEC ?= ruff==0.17.6
# pytest's worker processes (pytest-xdist; each test file stays on one worker, so a file's
# fixtures and its one-process baselines are shared): one per core of the 2-core machines
TEST_JOBS ?= 2
# nvcc, when on the PATH, compiles the CUDA kernels as part of `make test` (cuda-check, below).
NVCC ?= nvcc
HAVE_NVCC := $(shell command -v $(NVCC) 2>/dev/null)

.PHONY: all venv build test test-ready test-fast lint demo bench info gpu-check gpu-report gpu-sanitize cuda-check triton-check triton-check-subset clean

all: test

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja numpy tqdm safetensors transformers accelerate peft deepspeed "$(TRITON_SPEC)" matplotlib pytest pytest-xdist hypothesis pytest-benchmark expecttest "$(RUFF_SPEC)"
	touch $@

venv: $(VENV)/.deps

comma := ,
space := $(subst ,, )

# Put the checkout on the venv's path once (a .pth file: no second compile of fastkd._C, which an
# editable pip install would build in a directory of its own), then build in place; ninja
# recompiles only what changed. `pip install --no-build-isolation .` is the way to install it.
$(VENV)/.editable: $(VENV)/.deps setup.py
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'fastkd-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	touch $@

# (objects in build/inplace, apart from build/temp.* of `pip install .` in the same checkout,
# which compiles against another torch path: sharing them recompiled everything each time)
build: $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace --build-temp build/inplace

# With nvcc on the PATH (this machine's and CI's), the CUDA kernels are compiled first (cuda-check);
# then every Triton kernel through Triton's real compiler (the covering subset, both versions).
# The compile checks and the linter run side by side (make -j), then the tests on TEST_JOBS workers.
test:
	@$(MAKE) --no-print-directory build
	@$(MAKE) --no-print-directory -j3 test-ready
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

test-ready: lint $(if $(HAVE_NVCC),cuda-check) triton-check-subset

# What a developer runs on every edit: the build, then every test not marked slow (the multi-process
# launches, the demo and study runs, the full Triton and CUDA walks): a few minutes on 2 cores.
test-fast: build
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow" tests

# ruff over the whole tree (the rules and line length in pyproject.toml)
lint: $(VENV)/.deps
	$(PY) -m ruff check .

# Triton's compiler, ahead of time, no GPU needed (tools/triton_check.py): every kernel in every
# configuration its launchers choose, for sm_90 and sm_80, with the pinned Triton and TRITON_OLD;
# fails on a compile error or a budget missed, and rewrites docs/kernel-resources.md's table. Run
# it whenever fastkd/triton/ changes (about 40 minutes on 2 cores).
$(TRITON_OLD_DIR)/.installed:
	$(PIP) install -q --no-deps --target $(TRITON_OLD_DIR) "triton==$(TRITON_OLD)"
	touch $@

triton-check: build $(TRITON_OLD_DIR)/.installed
	$(PY) tools/triton_check.py --archs 90,80 --triton $(TRITON_OLD)=$(TRITON_OLD_DIR) --write-docs

# What make test compiles: every kernel x dtype x code-path constexpr at the largest block its
# launcher picks, sm_90, both Triton versions, checked against docs/kernel-resources.md (~2 min).
triton-check-subset: build $(TRITON_OLD_DIR)/.installed
	$(PY) tools/triton_check.py --subset --archs 90 --triton $(TRITON_OLD)=$(TRITON_OLD_DIR) --check-docs

# The main job: distil a small language model end to end (docs/demo.md); about 16 minutes on 2 cores (README).
demo: build
	$(PY) -m fastkd demo

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,rounds

info: build
	$(PY) -m fastkd info

# The CUDA device code (kernels/*.cu) compiled by nvcc alone -- no torch, no GPU -- to objects for
# sm_80 and sm_90a (and sm_100 where this nvcc has it), every warning an error; kernels/ must
# include no torch header. Objects in build/cuda-check/, rebuilt when a kernel or header changes.
CUDA_ARCHS := 80 90a $(if $(shell $(NVCC) --list-gpu-arch 2>/dev/null | grep -x compute_100),100a)
CUDA_FLAGS := -std=c++17 -O3 -Icsrc -Ikernels -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
	$(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a))
CUDA_OBJS := $(patsubst kernels/%.cu,build/cuda-check/%.o,$(wildcard kernels/*.cu))
CUDA_DEPS := $(wildcard kernels/*.h kernels/*.cuh) csrc/kd_math.h csrc/sparse_math.h

# (-keep leaves each arch's PTX in build/cuda-check/keep/, which tests/test_cuda_kernels.py reads
# instead of compiling again.) ptxas reports each instantiation's registers and spills
# (build/cuda-check/<op>.log); no spill, and
# registers for the plan's two blocks an SM, or cuda-check fails (tools/cuda_resources.py, whose
# table docs/kernel-resources.md holds: `python3 tools/cuda_resources.py --write` to refresh it).
cuda-check:
	@if grep -nE '^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/' kernels/*; then \
		echo "cuda-check: kernels/ must not include torch headers (launchers live in csrc/cuda/)"; exit 1; fi
	@$(MAKE) --no-print-directory -j2 $(CUDA_OBJS)
	@echo "cuda-check: $(notdir $(CUDA_OBJS)) compiled for sm_$(subst $(space),$(comma) sm_,$(strip $(CUDA_ARCHS)))"
	$(PYTHON) tools/cuda_resources.py --check $(CUDA_OBJS:.o=.log)

build/cuda-check/%.o: kernels/%.cu $(CUDA_DEPS)
	@mkdir -p $(@D)
	@mkdir -p build/cuda-check/keep
	$(NVCC) $(CUDA_FLAGS) -Xptxas -v -keep -keep-dir build/cuda-check/keep -c $< -o $@ 2> $(@:.o=.log) || \
		{ cat $(@:.o=.log); rm -f $@; exit 1; }

# On a machine with a CUDA GPU and its own torch + triton (no venv: the CPU torch above cannot
# see it): build in place with the CUDA kernels for this GPU, run the whole suite (the GPU backends on CUDA tensors), then the GPU
# benchmark, which writes benchmarks/results/gpu-<device>.md.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA device')"
	FASTKD_CUDA=1 TORCH_CUDA_ARCH_LIST=$$($(GPU_PY) -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a >= 9 else ''))") \
		$(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -m pytest -q -p no:cacheprovider tests
	$(GPU_PY) benchmarks/gpu_bench.py --output benchmarks/results/gpu-$$($(GPU_PY) -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))").md

# On a GPU machine with nothing but its own python3 (torch, triton, nvcc; no network): one report that
# always finishes within 8 minutes (every step time-boxed) and writes $(OUT)/summary.txt; without a
# GPU it ends at once, saying so (tools/gpu_report.sh).
OUT ?= gpu-report
gpu-report:
	OUT=$(OUT) GPU_PY=$(GPU_PY) bash tools/gpu_report.sh

# compute-sanitizer's memcheck and racecheck (shared-memory races) over the CUDA backend's tests,
# after gpu-check has built it; slow (minutes).
gpu-sanitize:
	for tool in memcheck racecheck; do \
		compute-sanitizer --tool $$tool --error-exitcode 1 --target-processes all \
			$(GPU_PY) -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_dispatch.py -k cuda || exit 1; \
	done

clean:
	rm -rf build *.egg-info fastkd/*.so csrc/build_info.h .pytest_cache .benchmarks

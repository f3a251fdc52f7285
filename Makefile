# fastkd: `make test` and `make demo` each work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch (on this kind of machine it is read from local disk, no download).
TORCH_SPEC ?= torch==2.13.0

.PHONY: all venv build test test-fast demo bench info gpu-check clean

all: test

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja numpy tqdm safetensors transformers accelerate triton matplotlib pytest hypothesis pytest-benchmark expecttest
	touch $@

venv: $(VENV)/.deps

# Put the checkout on the venv's path once (a .pth file: no second compile of fastkd._C, which an
# editable pip install would build in a directory of its own), then build in place; ninja
# recompiles only what changed. `pip install --no-build-isolation .` is the way to install it.
$(VENV)/.editable: $(VENV)/.deps setup.py
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'fastkd-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	touch $@

build: $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

# The main job: distil a small language model end to end (docs/demo.md); under 10 minutes on 2 cores.
demo: build
	$(PY) -m fastkd demo

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,rounds

info: build
	$(PY) -m fastkd info

# On a machine with a CUDA GPU and its own torch + triton (no venv: the CPU torch above cannot
# see it): build in place, run the whole suite (the GPU backends on CUDA tensors), then the GPU
# benchmark, which writes benchmarks/results/gpu-<device>.md.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA device')"
	$(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -m pytest -q -p no:cacheprovider tests
	$(GPU_PY) benchmarks/gpu_bench.py --output benchmarks/results/gpu-$$($(GPU_PY) -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))").md

clean:
	rm -rf build *.egg-info fastkd/*.so csrc/build_info.h .pytest_cache .benchmarks

# fastkd: `make test` and `make demo` each work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch (on this kind of machine it is read from local disk, no download).
TORCH_SPEC ?= torch==2.13.0

.PHONY: all venv build test test-fast demo bench info clean

all: test

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja numpy tqdm safetensors transformers triton pytest hypothesis pytest-benchmark expecttest
	touch $@

venv: $(VENV)/.deps

# Install editable once (that compiles fastkd._C), then recompile what changed (ninja, incremental).
$(VENV)/.editable: $(VENV)/.deps setup.py
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m fastkd info
	$(PY) -m fastkd bench --shapes 512x32000,256x128256 --repeats 3

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,rounds

info: build
	$(PY) -m fastkd info

clean:
	rm -rf build *.egg-info fastkd/*.so csrc/build_info.h .pytest_cache .benchmarks

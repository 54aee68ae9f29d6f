# deferredseg developer commands. `make test` and `make demo` work on a fresh machine:
# they create the virtual environment, install the pinned dependencies, build the
# extension and run; when nothing changed they only run.
#
#   make demo           the main job (see README): train + evaluate on synthetic data
#   make demo-backends  the objective and routing on every backend, with timings
#   make test           the whole test suite (CUDA-enabled torch 2.14.1 stack)
#   make test-cpu-only  build and test again with the CPU-only torch 2.13.0 stack
#   make test-stack     build (CPU kernels) and test the kernel layer on an older stack:
#                       STACK=2.11 (default; the GPU machine's torch 2.11.0 + triton 3.6.0)
#                       or STACK=2.6 (the oldest supported, torch 2.6.0 + triton 3.2.0)
#   make build          (re)build the C++/CUDA extension in place
#   make bench-cpu      CPU benchmark of the fused loss
#
# Variables: PYTHON (interpreter that creates the venv), VENV, REQS (requirements
# file), MAX_JOBS (parallel compile jobs), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements/torch-cuda.txt
MAX_JOBS ?= 2
PYTEST_ARGS ?=
DEMO_ARGS ?=
PY := $(VENV)/bin/python
SHELL := /bin/bash
# pip here warns about every missing local index folder; keep its real errors.
QUIET_PIP = 2>&1 | { grep -v "^WARNING: Location" || true; }; test $${PIPESTATUS[0]} -eq 0

# nvcc lives here on our machines; torch finds it through CUDA_HOME.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS

DEPS_STAMP := $(VENV)/.deps-stamp
EXT_SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
BUILD_STAMP := build/.ext-stamp-$(notdir $(abspath $(VENV)))

.PHONY: all venv build test test-cpu-only test-stack demo demo-backends bench-cpu clean

all: test

venv: $(DEPS_STAMP)

$(DEPS_STAMP): $(REQS) requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(REQS) $(QUIET_PIP)
	$(PY) -m pip check >/dev/null || $(PY) -m pip check
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

test: $(BUILD_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	$(PY) -m deferredseg demo $(DEMO_ARGS)

demo-backends: $(BUILD_STAMP)
	$(PY) -m deferredseg.backends_demo

bench-cpu: $(BUILD_STAMP)
	$(PY) benchmarks/bench_loss_cpu.py

# The CPU-only install path (what a laptop user gets): a copy of the tree built
# against torch 2.13.0 CPU in its own venv, tested, then installed as a user would
# (`pip install --no-build-isolation .`) and imported from outside the tree.
CPU_TREE := build/cpu-only-tree
CPU_VENV := $(abspath .venv-cpu)
test-cpu-only:
	@mkdir -p $(CPU_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t $(CPU_TREE)
	$(MAKE) -C $(CPU_TREE) test VENV=$(CPU_VENV) REQS=requirements/torch-cpu.txt PYTHON=$(PYTHON)
	$(CPU_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps $(CPU_TREE) $(QUIET_PIP)
	cd /tmp && $(CPU_VENV)/bin/python $(abspath .ci/smoke_installed.py) --expect-backend cpu --no-cuda

# Another point of the support matrix (requirements/torch-$(STACK).txt): a copy of the
# tree built against that torch in its own venv, CPU kernels only (DS_FORCE_CPU: CI has
# no GPU); then the package must import with compiled (not interpreted) Triton kernels,
# and the kernel layer's tests run: the Triton kernels compiled for sm_90 and run in the
# interpreter, the C++ CPU kernels, the routing.
STACK ?= 2.11
STACK_TREE := build/stack-$(STACK)-tree
STACK_VENV := $(abspath .venv-torch-$(STACK))
STACK_TESTS ?= tests/test_triton.py tests/test_cpu_kernel.py tests/test_route.py
test-stack:
	@mkdir -p $(STACK_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t $(STACK_TREE)
	DS_FORCE_CPU=1 $(MAKE) -C $(STACK_TREE) build VENV=$(STACK_VENV) REQS=requirements/torch-$(STACK).txt PYTHON=$(PYTHON)
	cd $(STACK_TREE) && env -u TRITON_INTERPRET $(STACK_VENV)/bin/python .ci/import_check.py --expect-ext
	$(MAKE) -C $(STACK_TREE) test VENV=$(STACK_VENV) REQS=requirements/torch-$(STACK).txt PYTHON=$(PYTHON) \
	  PYTEST_ARGS="$(PYTEST_ARGS) $(STACK_TESTS)"

clean:
	rm -rf build deferredseg_kernels/_C*.so

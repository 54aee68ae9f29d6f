# deferredseg developer commands. `make test` and `make demo` work on a fresh machine:
# they create the virtual environment, install the pinned dependencies, build the
# extension and run; when nothing changed they only run.
#
#   make demo           the main job (see README): train + evaluate on synthetic data
#   make demo-backends  the objective and routing on every backend, with timings
#   make test           the whole test suite, slow tests included (CUDA-enabled torch 2.14.1
#                       stack); PYTEST_ARGS='-m "not slow"' skips the slow ones for a quick loop
#   make demo-review    the review loop: train, predict, simulated experts answer over HTTP, merge
#   make browser        install Debian's chromium (for the review page's browser test) if missing
#   make test-cpu-only  the CPU-only torch 2.13.0 stack: test-sdist, then what differs there
#                       (the kernel layer on a sample of its cases, the import/install/packaging
#                       tests) with the extension of the wheel test-sdist built
#   make test-stack     build (CPU kernels) and test the kernel layer on an older stack:
#                       STACK=2.11 (default; the GPU machine's torch 2.11.0 + triton 3.6.0)
#                       or STACK=2.6 (the oldest supported, torch 2.6.0 + triton 3.2.0); the
#                       kernel layer's tests on 1 in SAMPLE (3) of their cases
#   make build          (re)build the C++/CUDA extension in place
#   make bench-cpu      CPU benchmark of the fused loss
#   make bench          pytest-benchmark suite (loss, routing; saved under .benchmarks/)
#   make bench-smoke    the same suite on tiny shapes (CI)
#   make lint           style checks: ruff (lint, import order, format) and clang-format on csrc/
#   make format         fix what make lint finds where a tool can (ruff --fix, ruff format, clang-format)
#   make dist           release files: sdist, wheel built from it, their checks
#   make test-sdist     sdist -> wheel -> fresh venv -> smoke test (CI, CPU-only stack)
#
# Variables: PYTHON (interpreter that creates the venv), VENV, REQS (requirements
# file), MAX_JOBS (parallel compile jobs), TEST_JOBS (test processes), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements/torch-cuda.txt
MAX_JOBS ?= 2
PYTEST_ARGS ?=
# The suite runs on TEST_JOBS worker processes (pytest-xdist; auto: one a core), each with
# one torch thread, so that the workers share the cores instead of oversubscribing them;
# TEST_JOBS=0 runs it in this process with torch's own thread count, as plain pytest does.
TEST_JOBS ?= auto
PYTEST_RUN = $(if $(filter 0,$(TEST_JOBS)),$(PY) -m pytest,OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_JOBS))
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
# the stamp of the extension built for the venv $(1), relative to its tree
ext_stamp = build/.ext-stamp-$(notdir $(abspath $(1)))
BUILD_STAMP := $(call ext_stamp,$(VENV))

.PHONY: all venv build browser lint format test test-cpu-only test-stack demo demo-review demo-backends bench-cpu clean

all: test

venv: $(DEPS_STAMP)

$(DEPS_STAMP): $(REQS) requirements/dev.txt requirements/lint.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(REQS) $(QUIET_PIP)
	$(PY) -m pip check >/dev/null || $(PY) -m pip check
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

# Style, with the pinned tools of requirements/lint.txt in a venv of their own (seconds to
# create, so `make lint` does not wait for torch). Configuration: pyproject.toml [tool.ruff]
# and .clang-format. CI runs `make lint` before the tests.
LINT_VENV ?= .venv-lint
LINT_STAMP := $(LINT_VENV)/.lint-stamp
CXX_FILES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cuda_emu/*.cpp')

$(LINT_STAMP): requirements/lint.txt
	@test -x $(LINT_VENV)/bin/python || $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q -r requirements/lint.txt $(QUIET_PIP)
	@touch $@

lint: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/clang-format --dry-run --Werror $(CXX_FILES)

format: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check --fix .
	$(LINT_VENV)/bin/ruff format .
	$(LINT_VENV)/bin/clang-format -i $(CXX_FILES)

# The review page is tested in a real headless Chromium: Debian's package, installed
# here when missing (CI runs as root with apt). Elsewhere the test is skipped with a note,
# except under CI, where it fails.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    chromium fonts-dejavu-core; \
	else echo "note: chromium is missing; 'sudo apt-get install chromium' enables the browser test"; fi

# The whole suite, the tests marked slow (subprocesses, signals, DDP and torchrun, the demos,
# the sdist) included: coverage comes from all of them. For a quick loop while developing:
#   make test PYTEST_ARGS='-m "not slow"'
test: $(BUILD_STAMP) browser
	$(PYTEST_RUN) $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	$(PY) -m deferredseg demo $(DEMO_ARGS)

demo-review: $(BUILD_STAMP)
	$(PY) -m deferredseg review-demo --simulate-experts $(DEMO_ARGS)

demo-backends: $(BUILD_STAMP)
	$(PY) -m deferredseg.backends_demo

bench-cpu: $(BUILD_STAMP)
	$(PY) benchmarks/bench_loss_cpu.py

# The stacks other than `make test`'s run the kernel layer's tests on a sample of their
# cases: every test function, for each backend, on 1 in SAMPLE of its parametrized cases
# (first and last kept, the rest evenly spread; DS_TEST_SAMPLE in tests/conftest.py). The
# kernels' sources and tests are the same everywhere and `make test` runs every case; what
# these stacks check is that the kernels build, register and compute right against that
# torch and triton. SAMPLE=1 runs every case there too.
SAMPLE ?= 3

# The CPU-only install path (what a laptop user gets), against torch 2.13.0 CPU in its own
# venv: first the release path (test-sdist: the sdist built from the tree, unpacked away
# from it and built into a wheel, checked, installed into a fresh venv and used from
# outside the tree); then the tests about the stack, CPU_TESTS, in a copy of the tree that
# holds the extension of that very wheel (one build serves both): the kernel layer (as
# test-stack: the Triton kernels in the interpreter, the C++ CPU kernels, the routing, with
# the checks that a CPU-only build has no CUDA kernels), the CUDA kernels emulated on the
# CPU and the GPU tests that must skip cleanly, the import, install and packaging tests.
# The user layer (training, evaluation, review) is pure Python on top: `make test` runs it
# once, on the CUDA-enabled stack.
CPU_TREE := build/cpu-only-tree
CPU_VENV := $(abspath .venv-cpu)
CPU_DIST := $(abspath $(CPU_TREE))/build/dist
CPU_TESTS ?= $(STACK_TESTS) tests/test_cuda_kernel.py tests/test_cuda_emulation.py \
  tests/test_install.py tests/test_packaging.py $(wildcard tests/test_imports.py)
test-cpu-only:
	@mkdir -p $(CPU_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t $(CPU_TREE)
	$(MAKE) -C $(CPU_TREE) venv VENV=$(CPU_VENV) REQS=requirements/torch-cpu.txt PYTHON=$(PYTHON)
	rm -rf $(CPU_DIST)
	KEEP_DIST=$(CPU_DIST) $(MAKE) test-sdist
	$(CPU_VENV)/bin/python -c 'import glob, sys, zipfile; \
	  zipfile.ZipFile(glob.glob(sys.argv[1])[0]).extract("deferredseg_kernels/_C.abi3.so", sys.argv[2])' \
	  "$(CPU_DIST)/*.whl" $(CPU_TREE)
	@touch $(CPU_TREE)/$(call ext_stamp,$(CPU_VENV))  # built: the wheel's extension
	DS_TEST_SAMPLE=$(SAMPLE) $(MAKE) -C $(CPU_TREE) test VENV=$(CPU_VENV) \
	  REQS=requirements/torch-cpu.txt PYTHON=$(PYTHON) PYTEST_ARGS="$(PYTEST_ARGS) $(CPU_TESTS)"

# Another point of the support matrix (requirements/torch-$(STACK).txt): a copy of the
# tree built against that torch in its own venv, CPU kernels only (DS_FORCE_CPU: CI has
# no GPU) and for the baseline x86-64 only (DS_CPU_ISA_VARIANTS=0: the AVX2 and AVX-512
# copies are the same source, built and tested by `make test` and test-cpu-only); then the
# package must import with compiled (not interpreted) Triton kernels, and the kernel
# layer's tests run on a sample of their cases (SAMPLE, above): the Triton kernels
# compiled for sm_90 and run in the interpreter, the C++ CPU kernels, the routing.
STACK ?= 2.11
STACK_TREE := build/stack-$(STACK)-tree
STACK_VENV := $(abspath .venv-torch-$(STACK))
STACK_TESTS ?= tests/test_conformance.py tests/test_triton.py tests/test_cpu_kernel.py tests/test_route.py \
  tests/test_contract.py
test-stack:
	@mkdir -p $(STACK_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t $(STACK_TREE)
	DS_FORCE_CPU=1 DS_CPU_ISA_VARIANTS=0 $(MAKE) -C $(STACK_TREE) build VENV=$(STACK_VENV) \
	  REQS=requirements/torch-$(STACK).txt PYTHON=$(PYTHON)
	cd $(STACK_TREE) && env -u TRITON_INTERPRET $(STACK_VENV)/bin/python .ci/import_check.py --expect-ext
	DS_TEST_SAMPLE=$(SAMPLE) DS_TEST_BACKENDS=cpu,triton $(MAKE) -C $(STACK_TREE) test VENV=$(STACK_VENV) \
	  REQS=requirements/torch-$(STACK).txt PYTHON=$(PYTHON) \
	  PYTEST_ARGS="$(PYTEST_ARGS) $(STACK_TESTS)"

clean:
	rm -rf build deferredseg_kernels/_C*.so

# ---- release and benchmarks ------------------------------------------------------------
# The install path of the source distribution, as a user meets it: the sdist built from
# the tree, unpacked away from it, built into a wheel against the CPU-only torch of
# $(CPU_VENV) (made by test-cpu-only), checked (contents, abi3 tag, twine, abi3audit),
# installed into a fresh venv and smoke-tested from outside the tree.
.PHONY: test-sdist dist bench bench-smoke
test-sdist:
	@test -x $(CPU_VENV)/bin/python || { echo "make test-sdist needs $(CPU_VENV): run make test-cpu-only"; exit 1; }
	bash .ci/test_sdist.sh $(CPU_VENV)/bin/python $(PYTHON)

# Release files in dist/: the sdist, and the wheel built from the unpacked sdist against
# this venv's torch (CUDA kernels when torch is a CUDA build and nvcc is found), checked.
DIST_DIR ?= dist
dist: $(DEPS_STAMP)
	rm -rf $(DIST_DIR)
	$(PY) -m build --no-isolation --outdir $(DIST_DIR) .
	$(PY) .ci/check_dist.py --sdist $(DIST_DIR)/*.tar.gz --wheel $(DIST_DIR)/*.whl
	$(PY) -m twine check --strict $(DIST_DIR)/*
	$(PY) -m abi3audit --strict --summary $(DIST_DIR)/*.whl

# pytest-benchmark: every run is saved under .benchmarks/ (compare two with
# --benchmark-compare, see README). BENCH_ARGS: more pytest / pytest-benchmark options.
BENCH_ARGS ?=
bench: $(BUILD_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-autosave $(BENCH_ARGS)

bench-smoke: $(BUILD_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --bench-smoke --benchmark-min-rounds=2 \
	  --benchmark-max-time=0.02 --benchmark-storage=file://$(abspath build/bench-smoke) \
	  --benchmark-autosave -q $(BENCH_ARGS)

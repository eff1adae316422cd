# fastseg: `make demo` and `make test` (the README's two commands), `make test-compat`,
# `make bench`.
# Each creates its venv if missing and installs the dev dependencies (torch 2.14.1: on the
# team's machines a CUDA 13.0 build from local disk). The build is incremental: ninja, in a
# persistent folder per Python and torch version (build/), one job per core (setup.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.14.1
DEV_DEPS := numpy pillow scipy pytest expecttest pytest-timeout matplotlib tqdm ninja setuptools wheel
# CUDA kernels: built when nvcc is on PATH (override: make test FASTSEG_BUILD_CUDA=0) - except
# by `make demo`, which builds them only where a GPU is visible (it cannot use them elsewhere).
NVCC_FOUND := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
GPU_VISIBLE := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1 || echo 0)
FASTSEG_BUILD_CUDA ?= $(NVCC_FOUND)
export FASTSEG_BUILD_CUDA
# Tells tests/test_build.py what the build must contain.
export FASTSEG_EXPECT_EXTENSION ?= 1
export FASTSEG_EXPECT_CUDA_KERNELS ?= $(FASTSEG_BUILD_CUDA)
PYTEST_FLAGS ?= -q -ra --timeout=900 --durations=15

# The GPU machine's toolchain (torch 2.11.0 / triton 3.6.0 / Python 3.12), in its own venv:
# fastseg built and installed as a wheel (CUDA kernels for that machine's sm_90 only), the
# tests run against the installed package (PYTHONSAFEPATH: never the source tree's fastseg).
# (pyenv's python3.12 shim runs only with a 3.12 selected: PYENV_VERSION=3.12.)
COMPAT_PYTHON ?= $(shell (python3.12 -c 'import sys; print(sys.executable)' || \
	PYENV_VERSION=3.12 python3.12 -c 'import sys; print(sys.executable)') 2>/dev/null | head -1)
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
# numpy < 2.4: triton 3.6's interpreter takes int() of one-element arrays, an error since
# numpy 2.4 (the interpreter tests only; triton 3.8's works with numpy 2.4).
COMPAT_TORCH_SPEC ?= torch==2.11.0 triton==3.6.0 "numpy<2.4"
COMPAT_CUDA_ARCHS ?= 9.0
# The whole suite: what can differ between toolchains (the C++ ops' opcheck, torch.compile
# of ops, models and engine, the Triton interpreter and ahead-of-time compiler) runs all over
# it, and a test green on one toolchain only is not green.
COMPAT_TESTS ?= tests

.PHONY: test test-compat demo bench install deps clean

# pip --no-compile: Python byte-compiles a module when it is first imported; compiling all of
# torch's at install is time that `make demo` on a fresh clone cannot spare.

$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --no-compile "$(TORCH_SPEC)" $(DEV_DEPS)
	touch $@

deps: $(VENV)/.deps-installed

install: deps
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not triton_interpret" tests
	# Triton's interpreter must be switched on before triton is imported: its own process.
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_FLAGS) -m triton_interpret tests/test_triton_interpret*.py

$(COMPAT_VENV)/.deps-installed: Makefile pyproject.toml
	@test -n "$(COMPAT_PYTHON)" || { echo "test-compat: no python3.12 found (the GPU machine's \
	Python); name one with COMPAT_PYTHON=..."; exit 1; }
	test -x $(COMPAT_PY) || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --disable-pip-version-check --no-compile $(COMPAT_TORCH_SPEC) $(DEV_DEPS)
	touch $@

test-compat: export TORCH_CUDA_ARCH_LIST = $(COMPAT_CUDA_ARCHS)
test-compat: $(COMPAT_VENV)/.deps-installed
	$(COMPAT_VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
	PYTHONSAFEPATH=1 $(COMPAT_PY) -c "import fastseg, torch, triton; print('test-compat:', \
	fastseg.__file__, 'torch', torch.__version__, 'triton', triton.__version__)"
	PYTHONSAFEPATH=1 $(COMPAT_PY) -m pytest $(PYTEST_FLAGS) -m "not triton_interpret" $(COMPAT_TESTS)
	PYTHONSAFEPATH=1 TRITON_INTERPRET=1 $(COMPAT_PY) -m pytest $(PYTEST_FLAGS) -m triton_interpret \
	tests/test_triton_interpret*.py
	# The GPU script's first two steps on the GPU machine's versions (same build folder: no compile).
	OUT=build/gpu-check-compat PYTHON=$(COMPAT_PY) GPU_CHECK_STEPS="env build" scripts/gpu_check.sh

# The demo cannot use CUDA kernels without a GPU: built only where one is visible.
demo: FASTSEG_BUILD_CUDA := $(if $(filter 1,$(GPU_VISIBLE)),$(FASTSEG_BUILD_CUDA),0)
demo: install
	$(VENV)/bin/fastseg demo --out demo-out

bench: install
	$(VENV)/bin/fastseg bench --out bench-out

clean:
	rm -rf build dist *.egg-info fastseg/_C*.so fastseg/_build_info.py bench-out demo-out

# fastseg: `make demo` and `make test` (the README's two commands), `make bench`.
# Both create .venv if missing, install the dev dependencies (torch 2.14.1: on the team's
# machines a CUDA 13.0 build from local disk) and build fastseg with its CUDA kernels
# whenever nvcc is found.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.14.1
DEV_DEPS := numpy pillow scipy pytest expecttest pytest-timeout matplotlib tqdm ninja setuptools wheel
# CUDA kernels: built when nvcc is on PATH (override: make test FASTSEG_BUILD_CUDA=0).
FASTSEG_BUILD_CUDA ?= $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
export FASTSEG_BUILD_CUDA
# Tells tests/test_build.py what the build must contain.
export FASTSEG_EXPECT_EXTENSION ?= 1
export FASTSEG_EXPECT_CUDA_KERNELS ?= $(FASTSEG_BUILD_CUDA)
PYTEST_FLAGS ?= -q -ra --timeout=900 --durations=15

.PHONY: test demo bench install deps clean

$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)" $(DEV_DEPS)
	touch $@

deps: $(VENV)/.deps-installed

install: deps
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not triton_interpret" tests
	# Triton's interpreter must be switched on before triton is imported: its own process.
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_FLAGS) -m triton_interpret tests/test_triton_interpret*.py

demo: install
	$(VENV)/bin/fastseg demo --out demo-out

bench: install
	$(VENV)/bin/fastseg bench --out bench-out

clean:
	rm -rf build dist *.egg-info fastseg/_C*.so fastseg/_build_info.py bench-out demo-out

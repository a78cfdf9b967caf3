# Every target does its own set-up: a local virtual environment, torch, the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# C++/CUDA library: built ahead of time by the editable install below (torch
# present, no build isolation); rebuilt when its sources change.
CSRC := $(wildcard spark_ext/csrc/*.cpp spark_ext/csrc/*.h spark_ext/csrc/cpu/*.cpp spark_ext/csrc/cpu/*.h spark_ext/csrc/cuda/*.cu)
export MAX_JOBS ?= 2

.PHONY: venv lint docs-build docs test demo bench bench-cpu doctor clean cuda-compile-check gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The build needs (numpy too: torch warns "Failed to initialize NumPy" without it)
# go in before the build, which runs without isolation against this torch.
# CUDA torch: CUDA kernels for TORCH_CUDA_ARCH_LIST, else the visible GPU, else
# the default list in spark_ext/_build.py (DEFAULT_CUDA_ARCH_LIST).
$(STAMP): $(PY) pyproject.toml setup.py spark_ext/_build.py $(CSRC)
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo,torchao,export,test-metrics,lightning,docs]"
	SPARK_EXT_NO_JIT=1 $(PY) -c "from spark_ext import _extension as e; e.load(); \
	    print('C++ library:', e.status()); print('CUDA kernels:', e.cuda_status())"
	touch $(STAMP)

venv: $(STAMP)

# nvcc compile-only check of spark_ext/csrc/cuda (no GPU needed; skipped without nvcc).
cuda-compile-check: $(STAMP)
	PYTHON=$(PY) bash .ci/cuda_compile_check.sh

# ruff lint and format check (configuration in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# The documentation site, built as the CI builds it: --strict turns a broken link, a missing page or an
# unresolved API reference into a failure. Output in build/site (ignored).
docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# Serve the documentation site at http://127.0.0.1:8000, rebuilt on every edit.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

test: $(STAMP) lint cuda-compile-check docs-build
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m spark_ext.cli demo

bench: $(STAMP)
	$(PY) -m spark_ext.cli bench

# CPU thread scaling of the C++ kernels at 1, 2 and all threads (estimated 4-6 min on an idle
# 2-core machine): JSON per op and thread count in ./spark-ext-bench (the ones kept go to
# docs/benchmarks/), README table printed.
bench-cpu: $(STAMP)
	$(PY) -m spark_ext.benchmarks.bench_threads

doctor: $(STAMP)
	$(PY) -m spark_ext.cli doctor

# On the GPU machine, no venv (the system torch is the one to test): build, tests, benchmarks, memcheck
# within GPU_CHECK_BUDGET_S (default 480 s), results streamed to GPU_CHECK_OUT. See
# spark_ext/benchmarks/gpu_check.py; GPU_CHECK_DRY_RUN=1 rehearses it on any machine.
gpu-check:
	$(PYTHON) -m spark_ext.benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info spark_ext/_C*.so spark_ext/_C_build.json

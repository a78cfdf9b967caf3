# Every target does its own set-up: a local virtual environment, torch, the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# C++/CUDA library: built ahead of time by the editable install below (torch
# present, no build isolation); rebuilt when its sources change.
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)
export MAX_JOBS ?= 2

.PHONY: venv test demo bench doctor clean cuda-compile-check gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo,test-metrics]"
	SPARK_EXT_NO_JIT=1 $(PY) -c "from spark_ext import _extension as e; e.load(); print('C++ library:', e.status())"
	touch $(STAMP)

venv: $(STAMP)

# nvcc compile-only check of csrc/cuda (no GPU needed; skipped without nvcc).
cuda-compile-check: $(STAMP)
	PYTHON=$(PY) bash .ci/cuda_compile_check.sh

test: $(STAMP) cuda-compile-check
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m spark_ext.cli demo

bench: $(STAMP)
	$(PY) -m spark_ext.cli bench

doctor: $(STAMP)
	$(PY) -m spark_ext.cli doctor

# On a GPU machine with torch preinstalled (no venv: the system torch is the one to test).
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info spark_ext/_C*.so spark_ext/_C_build.json

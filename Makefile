# Every target does its own set-up: a local virtual environment, torch, the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench doctor clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m spark_ext.cli demo

bench: $(STAMP)
	$(PY) -m spark_ext.cli bench

doctor: $(STAMP)
	$(PY) -m spark_ext.cli doctor

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands, each setting itself up: `make quickstart` and `make test` create .venv on first use (CPU torch
# from requirements-cpu.txt, the runtime and development requirements, the package in editable mode).
#   make quickstart [OUT=outputs/quickstart]   sample data -> cache -> train -> resume -> export (examples/quickstart)
#   make test                                  the whole test suite (make test-fast: without the slow multi-rank tests)
#   make lint                                  ruff
# On a GPU / NPU machine install your torch build first and pass TORCH_REQUIREMENTS= (empty) or the stack's
# file (requirements-gpu.txt / requirements-npu.txt).

PYTHON ?= python3
VENV ?= .venv
TORCH_REQUIREMENTS ?= requirements-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt $(TORCH_REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(addprefix -r ,$(TORCH_REQUIREMENTS)) -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

quickstart: $(STAMP)
	PYTHON=$(abspath $(PY)) bash examples/quickstart/run.sh

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

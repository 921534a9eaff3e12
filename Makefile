# Two entry points: `make demo` (build the embedded default end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# `make test-unconstrained`: a fresh venv installed as users install, without constraints.txt.
FRESH_VENV ?= .venv-unconstrained
PY := $(VENV)/bin/python
# Real DL19 data for the parity check when it sits beside the checkout; else the embedded corpus.
PARITY_DATA ?= $(wildcard ../shared/data/dl19)
OUT ?= resrank-build

.PHONY: install demo test test-unconstrained
install: $(VENV)/.installed

# torch first, pinned, so pip takes the CPU build instead of a multi-GB CUDA one.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

demo: install
	$(VENV)/bin/resrank-export build --out $(OUT) $(if $(PARITY_DATA),--parity-data $(PARITY_DATA))

test: install
	$(PY) -m pytest -q -ra --durations=25

# The newest set that pyproject.toml's ranges admit (what `pip install '.[all]'` resolves today),
# checked where a wrong range breaks silently: the served pipeline (tritonserver's python-backend
# stub runs on this environment's numpy). CI runs it after `make test`.
test-unconstrained:
	rm -rf $(FRESH_VENV)
	$(PYTHON) -m venv $(FRESH_VENV)
	$(FRESH_VENV)/bin/python -m pip install -q --upgrade pip
	$(FRESH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(FRESH_VENV)/bin/python -m pip install -q ".[all]"
	$(FRESH_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(numpy|nvidia-pytriton|tritonclient)=='
	$(FRESH_VENV)/bin/python -m pytest -q -ra tests/triton/test_triton_server.py

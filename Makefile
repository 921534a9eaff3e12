# Two entry points: `make demo` (build the embedded default end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Real DL19 data for the parity check when it sits beside the checkout; else the embedded corpus.
PARITY_DATA ?= $(wildcard ../shared/data/dl19)
OUT ?= resrank-build

.PHONY: install demo test
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
	$(PY) -m pytest -q -ra

# `make demo` and `make test` bootstrap .venv on first use.
# torch is installed only when the interpreter lacks it, so a user's own CUDA build is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev,peers]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unirec demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# ruff, then the tests that start no broker and no subprocess (marker `broker`) and are not
# marked `slow`: under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not broker and not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/scoring.py
	$(PY) bench/state_store.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

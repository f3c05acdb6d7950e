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

# Two test processes (pytest-xdist), each taking whole files (--dist loadfile): a module's
# tests share its broker and run in order (tests/test_stream_demo.py's second demo reuses the
# model its first one trained). The broker tests mostly wait on their subprocesses, so two run
# in about 9 minutes on 2 cores what one runs in 16. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST)

# ruff, then the tests that start no broker and no subprocess (marker `broker`) and are not
# marked `slow`: under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST) -m "not broker and not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/scoring.py
	$(PY) bench/state_store.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

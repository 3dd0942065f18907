# Two entry points a fresh machine needs: `make demo` and `make test`.
# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean bench dist docs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet torch-mlir || echo "torch-mlir not installable here: MLIR tests will report it"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnpass demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadgroup tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/attention_cpu.py

dist: $(STAMP)
	$(BIN)/python -m build --outdir dist .

docs: $(STAMP)
	$(BIN)/python -m attnpass.cli_reference -o docs/cli.md

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

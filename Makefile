# Two entry points on a fresh machine: `make demo` and `make test`. Both set up the virtualenv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-quick soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

# The seed's walk-through: export, configure, serve, query, stop.
demo: setup
	$(BIN)/remote-predict demo

test: setup lint
	$(BIN)/python -m pytest

# ruff check only: the code keeps its hand-wrapped 120-column layout, so `ruff format` is not used.
lint: setup
	$(BIN)/ruff check src tests examples benchmarks

# The hop-cost benchmark suite (about 25 minutes on 2 CPUs), and a reduced run (under a minute).
bench: setup
	$(BIN)/python benchmarks/suite.py --write benchmarks/RESULTS.md

bench-quick: setup
	$(BIN)/python benchmarks/suite.py --quick

# 100,000 requests through a master and two leaves: errors must be 0, memory flat.
soak: setup
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# normlab — the README's commands. `make setup` is idempotent; the others call it first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test lint bench demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would otherwise pull the CUDA build.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

test: setup lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/norm_layers.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/sync_stats.py

demo: setup
	$(BIN)/normlab demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

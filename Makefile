# Universal Neuron Atlas. Quick start: `make demo` (set up, precompute the embedded family, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DB ?= data/demo.db
DEMO_MODELS := $(sort $(wildcard zoo/stdlib-tiny/seed-*))
DEMO_TOKENS ?= 400000
# Tiny models stay below the paper's 0.5 (docs/embedded-family.md): the demo marks excess > 0.3 as universal.
DEMO_THRESHOLD ?= 0.3
HOST ?= 127.0.0.1
PORT ?= 8000
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install precompute-demo serve lint bench train-family clean

# torch first, with the exact pin: it is a CPU wheel on this disk; a looser pin pulls a multi-GB CUDA build.
$(BIN)/universal-neurons: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/universal-neurons

# Resumable: re-running continues an interrupted precompute, and does nothing once the run is complete; then the
# paper's published GPT-2 and Pythia tables join the atlas as published runs (idempotent).
precompute-demo: install
	mkdir -p $(dir $(DEMO_DB))
	$(BIN)/universal-neurons precompute --db $(DEMO_DB) --tokens $(DEMO_TOKENS) --threshold $(DEMO_THRESHOLD) $(DEMO_MODELS)
	$(BIN)/universal-neurons import-paper --db $(DEMO_DB)

demo: precompute-demo
	$(BIN)/universal-neurons serve --db $(DEMO_DB) --host $(HOST) --port $(PORT)

serve: install
	$(BIN)/universal-neurons serve --db $(DEMO_DB) --host $(HOST) --port $(PORT)

# The whole suite, offline. pytest exits 5 when a selection collects nothing: that is not a failure here.
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check precompute app cli bench tests

bench: install
	$(BIN)/python bench/correlation.py

# Reproduces the shipped family in zoo/stdlib-tiny (see docs/embedded-family.md for the measured run).
train-family: install
	$(BIN)/universal-neurons train --out zoo/stdlib-tiny --seeds 0 1 2 3 4 --save-dtype float16

clean:
	rm -rf $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(DEMO_DB).checkpoints

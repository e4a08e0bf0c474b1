# Two entry points that work on a fresh machine (Python 3.10+ with venv):
#   make demo   - set up .venv and run the main job
#   make test   - set up .venv (with the test extra) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: setup setup-test demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# dashscope ships the Qwen2 BPE vocabulary (qwen.tiktoken) we build tokenizer files from; only that data file
# is used, so its (heavy, unrelated) dependencies are skipped.
setup: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "dashscope>=2.0"

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "dashscope>=2.0"

demo: setup
	$(BIN)/omni-jax init --config configs/models/tiny.yaml $(DEMO_DIR)/tiny-random
	$(BIN)/omni-jax generate --model $(DEMO_DIR)/tiny-random --prompt "Give me a haiku about TPUs." --max-new-tokens 24

test: setup-test
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

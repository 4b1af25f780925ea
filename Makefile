# The two commands a new user types: `make run` and `make test`. Each builds .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
JOB ?= jobs/quickstart.yaml
STAMP := $(VENV)/.installed

.PHONY: run test test-slow venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the build that lies on this machine's disk (no multi-GB download).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/unlearn run $(JOB)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf results .cache mlruns.db mlartifacts

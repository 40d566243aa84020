# Shardforge: `make quickstart` runs the whole pipeline on the built-in corpus; `make test` runs the suite.
# Both create (or reuse) the virtual environment .venv and install the pinned stack from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat constraints.txt setup.py | sha256sum | cut -c1-12)
export PYTHONUNBUFFERED := 1
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip's notices about this machine's configured local indexes say nothing about the install: keep them off screen
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv quickstart test bench lint clean

venv: $(STAMP)

$(STAMP): constraints.txt setup.py
	@echo "installing the pinned stack (constraints.txt) into $(VENV): about 2 minutes the first time"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	@$(PY) -m pip install -q -c constraints.txt torch $(QUIET_PIP)
	@$(PY) -m pip install -q -c constraints.txt megatron-core psutil webdataset sentencepiece tensorboard \
		pydantic PyYAML tqdm datasketch zstandard numpy safetensors pytest pytest-timeout hjson ninja msgpack xxhash pyarrow \
		einops py-cpuinfo transformers lm-eval ruff $(QUIET_PIP)
	@$(PY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed $(QUIET_PIP)
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation --no-deps -e . $(QUIET_PIP)
	@rm -f $(VENV)/.installed-*
	@touch $@

quickstart: venv
	$(PY) -m launcher.quickstart

test: venv lint
	$(PY) -m pytest -q --durations=25 tests

bench: venv
	$(PY) bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check --quiet . && $(VENV)/bin/ruff format --check --quiet .

clean:
	rm -rf runs .pytest_cache

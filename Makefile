# Shardforge: `make quickstart` runs the whole pipeline on the built-in corpus; `make test` runs the suite.
# Both create (or reuse) the virtual environment .venv and install the pinned stack from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat constraints.txt setup.py | sha256sum | cut -c1-12)
export PYTHONUNBUFFERED := 1

.PHONY: venv quickstart test bench lint clean

venv: $(STAMP)

$(STAMP): constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt megatron-core psutil webdataset sentencepiece tensorboard \
		pydantic PyYAML tqdm datasketch zstandard numpy safetensors pytest pytest-timeout hjson ninja msgpack \
		einops py-cpuinfo transformers lm-eval
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

quickstart: venv
	$(PY) -m launcher.quickstart

test: venv
	$(PY) -m pytest -q --durations=25 tests

bench: venv
	$(PY) bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache

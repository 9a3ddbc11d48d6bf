# streamlearn — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test lint bench clean

install: $(STAMP)

# torch is pinned to the CPU build that lies on this disk; any other version pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# promtool/prometheus/alertmanager for the alert tests, chromium for the status-page test.
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
	    || ! command -v prometheus-alertmanager >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "installing Debian packages: prometheus prometheus-alertmanager chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager chromium fonts-dejavu-core >/dev/null; \
	fi

demo: install
	$(BIN)/streamlearn demo

lint: install
	$(BIN)/ruff check .

test: install system-deps lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

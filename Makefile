# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test matrix sweep bench docs lint netns-deps redis clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# iproute2 and nftables for the netns lab, and redis-server for the cluster tests
# (issue 18), installed with apt-get when we are root and they are missing; without
# root the netns tests skip and say why (and so do the cluster tests, but not in CI).
netns-deps:
	@if [ "$$(id -u)" = 0 ] && ! { command -v ip && command -v nft && command -v redis-server; } >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables redis-server; \
	fi

# A redis-server on 127.0.0.1:6379 in the foreground (no persistence), for trying
# `punch-rendezvous --redis redis://127.0.0.1:6379 --workers 2` by hand; Ctrl-C stops it.
redis: $(STAMP) netns-deps
	$(PY) -m tools.redis

demo: $(STAMP) netns-deps
	$(PY) -m netns.demo

test: $(STAMP) netns-deps
	$(PY) -m pytest

# The full NAT behaviour matrix (10 trials a cell, as root, about 15 minutes):
# prints the table, writes netns/matrix.json, and regenerates README.md's table.
matrix: $(STAMP) netns-deps
	$(PY) -m netns.matrix --trials 10 --readme

# The timing sweep of issue 12 (as root): cone-like NAT pairs x WAN delay x one side's
# introduction late; prints the table, writes netns/sweep.json and README.md's table.
sweep: $(STAMP) netns-deps
	$(PY) -m netns.sweep --trials $(or $(TRIALS),10) --readme

# Every benchmark of issue 5 (as root, under 15 minutes): prints the table,
# writes benchmarks/results.json, and regenerates README.md's performance section.
bench: $(STAMP) netns-deps
	$(PY) -m benchmarks --readme

# README.md's API reference (from docstrings) and `punch --help` section.
docs: $(STAMP)
	$(PY) -m tools.docs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests netns examples tools benchmarks
	$(VENV)/bin/ruff format --check src tests netns examples tools benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.carefl-installed

# Real data shipped beside the repo (CI and this workplace); the product itself only reads CAREFL_DATA.
ifneq ($(wildcard ../shared/data),)
export CAREFL_DATA ?= $(abspath ../shared/data)
endif
# No phone-home from any process we start.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(STAMP): requirements.lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/carefl demo $(ARGS)

# Three workers on 2 cores, one test module each at a time: the deployment tests spend most of their time
# waiting on real processes (rounds, heartbeats, restarts), so a third worker uses the idle CPU;
# tests/conftest.py puts the longest modules first (and xdist keeps that order).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=12 tests $(PYTEST_ARGS)

# Quick pass (< 10 min on 2 cores): prints every table and refreshes docs/BENCHMARKS.md.
# `make bench ARGS=--full` for the full-size figures (hours); `ARGS="--only scale"` for one module.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

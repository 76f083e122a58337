# Two commands on a fresh machine: `make demo` (train + sample + evaluate on digits) and
# `make test`. Each creates or reuses ./.venv and installs what it needs (idempotent: pip runs
# again only when setup.py changes).

PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/digits
CONFIG ?= configs/digits.py
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean-venv

$(STAMP): setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)

# Two pytest-xdist workers: the suite is dominated by single-threaded XLA compiles. Each test
# file runs whole on one worker, in order, so its module fixtures are built once (with
# `--dist load`, interleaved files tore them down and rebuilt them: ~160 worker-s measured).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)

# Two commands on a fresh machine: `make demo` (train + sample + evaluate on digits) and
# `make test`. Each creates or reuses ./.venv and installs what it needs (idempotent: pip runs
# again only when setup.py changes).

# The interpreter of .venv: Python 3.12 where one is installed (the current JAX needs it), else
# python3 (JAX 0.10, the floor). `make clean-venv` after changing it.
PYTHON ?= $(shell sh tools/find_python.sh)
FLOOR_PYTHON ?= python3
VENV ?= .venv
FLOOR_VENV ?= .venv-floor
WORKDIR ?= runs/digits
CONFIG ?= configs/digits.py
STAMP := $(VENV)/.installed

.PHONY: demo test test-floor lint install clean-venv

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

# The oldest JAX setup.py allows (0.10.0, on Python < 3.12), with a quick part of the suite: the
# train step, the initializers' bit-exact draws, the reference updates, processes, the work dir
# and checkpoints, the EMAs. CI runs it after `make test`.
FLOOR_TESTS = tests/test_training.py tests/test_initializers.py tests/test_reference_updates.py \
	tests/test_processes.py tests/test_workdir.py tests/test_ema.py

$(FLOOR_VENV)/.installed: setup.py
	@test -x $(FLOOR_VENV)/bin/python || $(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e ".[dev]" "jax==0.10.0" "jaxlib==0.10.0"
	@touch $@

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c 'import jax, sys; print("floor: jax", jax.__version__, "python", sys.version.split()[0])'
	$(FLOOR_VENV)/bin/python -m pytest -q -n 2 --dist loadfile $(FLOOR_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV) $(FLOOR_VENV)

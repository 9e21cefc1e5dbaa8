# make demo: set up, then run the main job on sample documents.
# make test: set up, then run the test suite.
# make gpu-wheels: docpipe's wheel and the wheels `docpipe bench --gpu-check` and tests/gpu need on an offline GPU
#                 host (Python 3.12, torch 2.11 by default; the pinned transformers), into .whl/ (git-ignored), to copy
#                 there with the checkout (docs/engines.md: "On an offline GPU host"). GPU_WHEELS_ARGS passes options,
#                 e.g. GPU_WHEELS_ARGS='--torch 2.12 --transformers host'.
# make docs: regenerate the reference pages docs/reference/cli.md and config.md from the parser and the options.
# make lock: re-resolve the dependencies in a throw-away virtualenv and rewrite constraints.txt (the pins that
#            make setup and infra/Dockerfile install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

LOCK_VENV ?= .lock-venv
# Test files run this many at a time (pytest-xdist), each file's tests in one process, in order (--dist loadfile:
# a file's module fixtures, such as a run several tests read, are made once), longest files first
# (tests/conftest.py LONGEST_FIRST; --no-loadscope-reorder keeps that order, not xdist's by test count).
# Both tiers run: the in-process and local-executor tests, and those marked `ray` (pytest -m ray: the wiring
# through Ray, proved once each). TEST_ARGS adds to the line, e.g. TEST_ARGS='-m "not ray"' for the fast tier
# alone. -rs: every skip's reason.
# One OpenMP thread a process (torch's intra-op pool): two test workers, the CLI commands they start and Ray's
# workers share the cores; a pool of a thread per core in each of them made the suite 13% slower on two cores.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
TEST_ARGS ?=

# The lowest transformers pyproject.toml admits, installed on its own beside the venv: the engine-equality test
# runs once under it (tests/test_engines.py, PYTHONPATH=$(FLOOR)). With it, the huggingface_hub it accepts (< 2)
# and the httpx that hub imports (the venv's hub 2 uses httpx2); everything else is the venv's.
FLOOR ?= .venv-floor
FLOOR_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
FLOOR_PACKAGES := transformers==$(FLOOR_TRANSFORMERS) huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9

.PHONY: setup floor demo test docs gpu-wheels lock clean

setup: $(VENV)/.docpipe-installed

floor: $(FLOOR)/.installed-$(FLOOR_TRANSFORMERS)

$(FLOOR)/.installed-$(FLOOR_TRANSFORMERS): pyproject.toml | setup
	rm -rf $(FLOOR)
	$(PY) -m pip install --quiet --no-deps --target $(FLOOR) $(FLOOR_PACKAGES)
	touch $@

$(VENV)/.docpipe-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/docpipe demo --workdir demo_output

test: setup floor
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -rs \
		--durations=20 $(TEST_ARGS)

docs: setup
	$(PY) -m docpipe.tools.reference

GPU_WHEELS_ARGS ?=

gpu-wheels: setup
	$(PY) -m docpipe.jobs.gpu_wheels fetch $(GPU_WHEELS_ARGS)

# Resolved without the old pins (that is the point), in a fresh virtualenv, so the file lists exactly what
# pyproject.toml pulls in today. Written to a temporary file first: a failed resolution leaves the pins as they were.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# Pinned versions for make setup and infra/Dockerfile (pip install -c constraints.txt ...): what a fresh"; \
	  echo "# install of '.[dev]' resolved to with $$($(LOCK_VENV)/bin/python -V). Refresh with 'make lock' after"; \
	  echo "# changing dependencies in pyproject.toml; never edit by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --exclude docpipe; } > constraints.txt.new
	$(LOCK_VENV)/bin/python -m pip check
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf demo_output .pytest_cache $(LOCK_VENV) constraints.txt.new $(FLOOR)

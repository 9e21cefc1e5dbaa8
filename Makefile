# make demo: set up, then run the main job on sample documents.
# make test: set up, then run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

setup: $(VENV)/.docpipe-installed

$(VENV)/.docpipe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/docpipe demo --workdir demo_output

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

clean:
	rm -rf demo_output .pytest_cache

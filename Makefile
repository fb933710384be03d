# VeloxSeg developer commands. Each target creates/uses .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.veloxseg-installed

.PHONY: test bench bench-page demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a plain `pip install torch` would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,plot]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q Testing

bench: $(STAMP)
	$(PY) -m VeloxSegLib.cli bench --output docs/benchmarks.md $(if $(REFERENCE),--reference $(REFERENCE))

# the page again from the saved figures and comparisons (docs/training-comparison*.json): measures nothing
bench-page: $(STAMP)
	$(PY) -m VeloxSegLib.cli bench --render-only --output docs/benchmarks.md

demo: $(STAMP)
	$(PY) -m VeloxSegLib.cli demo --output demo_output

clean:
	rm -rf $(VENV) build *.egg-info demo_output

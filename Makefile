# radforge — set-up, tests, demo, benchmarks, cluster targets.
# `make test` and `make demo` work on a fresh clone: both create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU machines pin the CPU torch build through constraints.txt (never a multi-GB CUDA wheel).
# GPU users: `make setup CONSTRAINTS=` and install their CUDA build of torch first.
CONSTRAINTS ?= constraints.txt
STAMP  := $(VENV)/.installed
# PIP_CONSTRAINT (not -c) so that build environments of source packages honour the pin too.
PIN    := $(if $(CONSTRAINTS),PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)))

DEMO_DIR ?= var/demo
PYTEST_ARGS ?=

.PHONY: setup test demo bench lint clean ray-job-ingest help

help:
	@echo "make setup   create .venv and install radforge with test extras"
	@echo "make test    run the test suite"
	@echo "make demo    build a sample corpus and ingest it to $(DEMO_DIR)/shards"
	@echo "make bench   run the ingest benchmark (ratios measured side by side)"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, from the pinned build, so nothing else can pull a different one.
	$(PIN) $(PIP) install --quiet torch
	$(PIN) $(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m radforge.demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(VENV)/bin/radforge bench ingest

lint: $(STAMP)
	$(PY) -m compileall -q platform jobs tests

# Submit the ingest to a running Ray cluster (RAY_ADDRESS=http://head:8265).
ray-job-ingest:
	ray job submit --working-dir . -- python -m jobs.ingest $(SOURCE) $(DEST) $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache

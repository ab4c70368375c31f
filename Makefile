# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# the demo needs the package and its runtime dependencies only
RUN_STAMP := $(VENV)/.run-stamp

.PHONY: run test bench lint typecheck unit deps images clean-venv help

help:
	@echo "make run    - set up, start a pool of 8 warm Python instances, use it, stop it"
	@echo "make test   - set up, then ruff, mypy --strict and the whole pytest suite"
	@echo "make bench  - run benchmarks/ and write benchmarks/results/*.json"
	@echo "make deps   - install the Debian packages the sandbox kinds need (root)"
	@echo "make images - build the jail/oci/microvm images (noodle image build; into /var/lib/noodle/images)"

$(STAMP): pyproject.toml setup.cfg setup.py noodle/_shm.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml setup.cfg setup.py noodle/_shm.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $(RUN_STAMP)

deps:
	bash scripts/install-deps.sh

images: deps $(RUN_STAMP)
	$(VENV)/bin/noodle image build jail oci microvm

run: $(RUN_STAMP)
	$(VENV)/bin/noodle demo --name demo --pool-size 8

lint: $(STAMP)
	$(VENV)/bin/ruff check noodle workers tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict noodle workers

unit: $(STAMP)
	$(PY) -m pytest

test: $(STAMP) images lint typecheck unit

bench: $(STAMP) images
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)

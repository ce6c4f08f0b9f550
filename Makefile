# loratune: `make test` is what CI runs; `make demo` runs the main job.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?= -m "not external"

.PHONY: install test lint typecheck protos protos-check pytest demo serve-evaluator bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch goes first, pinned: where there is no GPU this takes the local CPU build instead
# of several GB of CUDA packages pulled in by an unpinned requirement.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy services

protos: install
	$(PY) scripts/gen_protos.py

protos-check: install
	$(PY) scripts/gen_protos.py --check

pytest: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck protos-check pytest

serve-evaluator: install
	$(VENV)/bin/loratune serve evaluator --port 50053 --metrics-port 9093

demo: install
	@echo "make demo runs a whole study once the optimizer service exists (issue 5); not yet."
	@exit 1

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/evaluator_bertscore.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache

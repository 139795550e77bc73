# Every target makes (or reuses) the virtualenv itself, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-fast test-fast-unit test-fast-waiting test-fast-integration test-e2e lint train train-deps bench docs clean lock check-lock

# Installs come from the lock files, exact versions with hashes (pip's hash-checking mode):
#   requirements.lock      what serving needs (the Docker image installs it too)
#   requirements-dev.lock  plus training, tests and tools (the dev extra); the versions they share are the same
# torch is the one package left out of both: scripts/install-torch.sh installs it after the lock (the CPU
# build unless a GPU is visible; it says how it chooses), with --no-deps where its dependencies are the
# CPU build's, which the locks pin (filelock, sympy, networkx, jinja2, fsspec, setuptools, ...). So nothing
# here installs PyPI's default Linux torch, the CUDA one, and its nvidia-* packages (several GB).
# After changing dependencies in pyproject.toml: `make lock`, and commit the locks (.ci/run checks them).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/.serve: requirements.lock pyproject.toml scripts/install-torch.sh | $(BIN)/python  ## what serving needs, nothing more
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	scripts/install-torch.sh $(BIN)/pip
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.dev: requirements-dev.lock pyproject.toml scripts/install-torch.sh | $(BIN)/python  ## plus training, tests and tools
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	scripts/install-torch.sh $(BIN)/pip
	$(BIN)/pip install -q --no-deps -e .
	touch $@ $(BIN)/.serve

# `make lock` resolves pyproject.toml again with uv (pinned below), keeping the locked versions that still
# fit; `make lock LOCK_ARGS=--upgrade` takes the newest that fit. It resolves for Linux x86_64, Python 3.11,
# against the CPU build of torch: by default the wheel in /opt/wheels (this kind of machine has one);
# elsewhere, say `make lock TORCH_LOCK_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu
# --index-strategy unsafe-best-match"`. A lock that names an nvidia-* or triton package is refused.
UV_VERSION        := 0.13.9
TORCH_LOCK_SOURCE ?= --find-links /opt/wheels
LOCK_ARGS         ?=
LOCK_OPTS          = --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
                     --no-emit-package torch --custom-compile-command "make lock" $(TORCH_LOCK_SOURCE) $(LOCK_ARGS)
# The key of what the locks were made from: the dependencies, the dev extra and requires-python.
LOCK_KEY = $(PYTHON) -c 'import hashlib, json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
  print(hashlib.sha256(json.dumps([p["dependencies"], p["optional-dependencies"]["dev"], p["requires-python"]]).encode()).hexdigest()[:16])'
define LOCK_HEADER
# Exact versions with hashes, made by `make lock` from pyproject.toml; install with
#   pip install --require-hashes -r THIS_FILE, then scripts/install-torch.sh (the Makefile does both).
# torch is left out on purpose (see "excluded" at the end): scripts/install-torch.sh installs the CPU build
# (or the CUDA one where a GPU is visible, or TORCH_INDEX_URL's) after it; the dependencies of the CPU build
# are pinned here, and no nvidia-* or triton package is. .ci/run fails while this key is not pyproject's:
endef
export LOCK_HEADER

$(BIN)/uv: | $(BIN)/python
	$(BIN)/pip install -q uv==$(UV_VERSION)

lock: | $(BIN)/uv  ## regenerate requirements.lock and requirements-dev.lock from pyproject.toml
	@set -e; key=$$($(LOCK_KEY)); \
	for f in requirements-dev.lock requirements.lock; do [ -f $$f ] && cp $$f $$f.tmp || rm -f $$f.tmp; done; \
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_OPTS) -o requirements-dev.lock.tmp; \
	$(BIN)/uv pip compile pyproject.toml -c requirements-dev.lock.tmp $(LOCK_OPTS) -o requirements.lock.tmp; \
	for f in requirements-dev.lock requirements.lock; do \
	  if grep -Eq '^(nvidia-|triton==|torch==)' $$f.tmp; then \
	    echo "$$f: resolved against a CUDA build of torch (nvidia-*/triton); see TORCH_LOCK_SOURCE" >&2; rm -f $$f.tmp; exit 1; fi; \
	  { echo "$$LOCK_HEADER"; echo "# pyproject.toml key: $$key"; sed 's/requirements-dev\.lock\.tmp/requirements-dev.lock/; /^# pyproject.toml key: /d; /^# Exact versions with hashes, made by/,/^# are pinned here, and no nvidia/d' $$f.tmp; } > $$f; \
	  rm -f $$f.tmp; echo "$$f: $$(grep -c '^[a-zA-Z0-9].*==' $$f) packages"; \
	done

check-lock:  ## fail if pyproject.toml's dependencies changed since the last `make lock`
	@key=$$($(LOCK_KEY)); for f in requirements.lock requirements-dev.lock; do \
	  grep -qx "# pyproject.toml key: $$key" $$f || { echo "$$f does not match pyproject.toml: run make lock" >&2; exit 1; }; \
	done; echo "locks match pyproject.toml ($$key)"

serve: $(BIN)/.serve  ## start the service on the committed artifacts
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(BIN)/.dev  ## run the whole test suite (tests/unit, tests/integration, tests/e2e), as CI does
	$(BIN)/python -m pytest -q

# test-fast: tests/unit and tests/integration as three pytest runs at once, split so that each keeps a core busy:
# the connection and gRPC call-limit tests, the canary guard's and the tracing tests mostly wait (on their servers'
# timeouts, a canary's window, an exporter's retries), so they share a run. One run of both folders takes longer.
WAITING_TESTS := tests/integration/test_connections.py tests/integration/test_grpc_call_limits.py \
	tests/unit/test_canary_guard.py tests/unit/test_tracing.py
# The fuzzing tools' pytest plugins (only tests/e2e uses them) cost each run a second of CPU to import.
FAST_PYTEST := $(BIN)/python -m pytest -q -p no:schemathesis -p no:hypothesispytest
test-fast: $(BIN)/.dev  ## unit and integration tests: stub model, small artifacts, no training (under a minute)
	@$(MAKE) --no-print-directory -j3 --output-sync=target test-fast-unit test-fast-waiting test-fast-integration

test-fast-unit:
	$(FAST_PYTEST) tests/unit $(addprefix --ignore=,$(filter tests/unit/%,$(WAITING_TESTS)))
test-fast-waiting:
	$(FAST_PYTEST) $(WAITING_TESTS)
test-fast-integration:
	$(FAST_PYTEST) tests/integration $(addprefix --ignore=,$(filter tests/integration/%,$(WAITING_TESTS)))

test-e2e: $(BIN)/.dev  ## end-to-end tests: the real models, real clients, training runs, abuse suite, fuzzing, browser
	$(BIN)/python -m pytest -q tests/e2e

lint: $(BIN)/.dev  ## ruff (lint, then format --check) and mypy (pyproject.toml configures all three): zero findings
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

MODEL ?= all
train: $(BIN)/.dev  ## retrain MODEL (default: all) on ../shared/data (or $$DATA_DIR), e.g. make train MODEL=phone-price
	$(BIN)/python -m training $(MODEL)

train-deps: $(BIN)/.dev  ## install what training needs (the train extra, from the dev lock) without training

bench: $(BIN)/.dev
	$(BIN)/python -m benchmarks.load --rounds 5 --duration 3

docs: $(BIN)/.dev  ## build the documentation site into site/; any warning (a broken link, a missing page) fails it
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache

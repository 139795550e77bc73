# Every target makes (or reuses) the virtualenv itself, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-fast train bench clean

$(BIN)/.torch:  ## the pinned torch, CPU build unless a GPU is visible (scripts/install-torch.sh says how it chooses)
	$(PYTHON) -m venv $(VENV)
	scripts/install-torch.sh $(BIN)/pip
	touch $@

$(BIN)/.serve: pyproject.toml $(BIN)/.torch  ## what serving needs, nothing more
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.dev: pyproject.toml $(BIN)/.torch  ## plus training, tests and tools
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(BIN)/.serve

serve: $(BIN)/.serve  ## start the service on the committed artifacts
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(BIN)/.dev  ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.dev  ## the suite without real-model servers and training runs (under a minute)
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

train: $(BIN)/.dev  ## retrain every model on ../shared/data (or $$DATA_DIR)
	$(BIN)/python -m training all

bench: $(BIN)/.dev
	$(BIN)/python -m benchmarks.load --rounds 5 --duration 3

clean:
	rm -rf $(VENV) .pytest_cache

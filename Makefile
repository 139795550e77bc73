# Every target makes (or reuses) the virtualenv itself, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-fast train bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

serve: $(BIN)/.installed  ## start the service on the committed artifacts
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(BIN)/.installed  ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed  ## the suite without real-model servers and training runs (under a minute)
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

train: $(BIN)/.installed  ## retrain every model on ../shared/data (or $$DATA_DIR)
	$(BIN)/python -m training all

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.load --rounds 5 --duration 3

clean:
	rm -rf $(VENV) .pytest_cache

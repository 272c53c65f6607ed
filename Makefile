# Two commands on a fresh machine: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp

.PHONY: install demo test unit integration chaos bench web up flower relay lint format clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)

# Everything: the engine with every extra, and the test and lint tools.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP) $(DEMO_STAMP)

# Only what the demo uses (the engine and [local]: a private Redis), with the installer's
# progress shown. uv (one wheel from PyPI) installs it in ~5 s where pip takes ~20 on two busy
# cores; pip does it when uv cannot be had.
UV_INSTALL  := $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e '.[local]'
PIP_INSTALL := $(BIN)/python -m pip install --progress-bar on --disable-pip-version-check
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	@echo "installing the engine and what the demo needs (one time)..."
	@if $(PIP_INSTALL) uv; then \
		echo "$(UV_INSTALL)" && $(UV_INSTALL); \
	else \
		echo "uv unavailable: installing with pip" && $(PIP_INSTALL) -e '.[local]'; \
	fi
	@touch $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m tasks.demo

test: install lint
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

# 1000 order sagas through 60 s of worker SIGKILLs and a Redis restart, then the audit; then
# three hosts in network namespaces (root): one cut off for 60 s, one SIGKILLed, 30 s step limits.
# (`make test` runs smaller versions: tests/chaos/test_chaos.py, tests/chaos/test_hosts.py.)
chaos: install
	$(BIN)/python -m tests.chaos.run --sagas 1000 --kill-seconds 60
	$(BIN)/python -m tests.chaos.hosts --fault partition --partition-seconds 60
	$(BIN)/python -m tests.chaos.hosts --fault kill

# Our saga vs a raw Celery chain, same broker and workers, same run: make bench BENCH_ARGS="-n 500"
bench: install
	$(BIN)/sagas bench $(BENCH_ARGS)

# The Procfile's pieces, against REDIS_URL and DATABASE_URL (defaults: local Redis, SQLite).
up: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -p $${PORT:-8000}

web: install
	$(BIN)/sagas -A config db upgrade && $(BIN)/python -m tasks.migrate \
		&& $(BIN)/uvicorn config.web:app --port $${PORT:-8000}

flower: install
	$(BIN)/celery -A config flower --port=$${FLOWER_PORT:-5555}

relay: install
	$(BIN)/sagas -A config relay

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf var artifacts .pytest_cache .ruff_cache

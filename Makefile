# Two commands on a fresh machine: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp

.PHONY: install demo test test-rabbitmq unit integration chaos bench web up ps flower relay lint \
	format clean

# make up's supervisord: its control socket, its log and one log per program (supervisord.conf).
SAGAS_RUN_DIR ?= $(CURDIR)/var/run
# Web app, workers and relay count metrics in one directory (README, Metrics); the first
# process to start empties it of an earlier run's files. The Procfile's default is the same.
METRICS_DIR ?= $(CURDIR)/var/metrics

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

# The whole suite on Redis (SQLite and PostgreSQL), then the integration and chaos suites again
# with RabbitMQ as the broker (README, RabbitMQ).
test: install lint
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-rabbitmq

# Integration and chaos on RabbitMQ at 127.0.0.1:5672 (a vhost per session, made and deleted
# with rabbitmqctl), on SQLite only: the stores are covered on Redis. The demo and the bench
# bring their own Redis as broker, so they have nothing to say here. Unreachable RabbitMQ:
# skipped, and a failure under CI=true.
test-rabbitmq: install
	SAGAS_TEST_BROKER=rabbitmq SAGAS_TEST_DATABASES=sqlite $(BIN)/pytest -q \
		tests/integration tests/chaos \
		--ignore=tests/integration/test_demo.py --ignore=tests/integration/test_bench.py

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

# Every chaos scenario at full size, then one table (exit 1 on any loss): 1000 order sagas through
# 60 s of worker SIGKILLs, a broker FLUSHALL and a broker restart while half of them are in flight,
# on SQLite and on a private PostgreSQL cluster restarted twice (fast, then down 30 s); then three
# hosts in network namespaces (root): one cut off for 60 s, one SIGKILLed. BROKER=rabbitmq for
# RabbitMQ. `make test` runs smaller versions (tests/chaos/test_chaos.py, test_hosts.py).
chaos: install
	$(BIN)/python -m tests.chaos.report --sagas 1000 --kill-seconds 60 $(if $(BROKER),--broker $(BROKER))

# The long soak (not part of `make test`): order sagas at about half the measured capacity for
# SOAK_MINUTES, a worker SIGKILLed every 30-60 s, a broker wipe and a database restart every
# 10 min, sampled every 10 s; fails on a lost, stuck or doubled saga, RSS growth over 20 % or a
# queue that keeps growing. CSV, PNG and summary in SOAK_OUT (tests/chaos/soak.py).
SOAK_MINUTES ?= 30
SOAK_OUT ?= artifacts/soak
.PHONY: soak
soak: install
	$(BIN)/python -m tests.chaos.soak --minutes $(SOAK_MINUTES) --out $(SOAK_OUT)

# Our saga vs a raw Celery chain, same broker and workers, same run: make bench BENCH_ARGS="-n 500"
bench: install
	$(BIN)/sagas bench $(BENCH_ARGS)

# The Procfile's processes under supervisord, against BROKER_URL/REDIS_URL and DATABASE_URL
# (defaults: local Redis, SQLite). One process that dies is restarted; the others run on.
# `make ps` (from another shell) lists them; logs are in $(SAGAS_RUN_DIR)/log.
up: install
	@mkdir -p "$(SAGAS_RUN_DIR)/log"
	PATH="$(CURDIR)/$(BIN):$$PATH" SAGAS_RUN_DIR="$(SAGAS_RUN_DIR)" \
		$(BIN)/supervisord -c supervisord.conf

ps: install
	SAGAS_RUN_DIR="$(SAGAS_RUN_DIR)" $(BIN)/supervisorctl -c supervisord.conf status

web: install
	export PROMETHEUS_MULTIPROC_DIR="$${PROMETHEUS_MULTIPROC_DIR:-$(METRICS_DIR)}"; \
	$(BIN)/sagas -A config db upgrade && $(BIN)/python -m tasks.migrate \
		&& $(BIN)/uvicorn config.web:app --port $${PORT:-8000}

flower: install
	$(BIN)/celery -A config flower --port=$${FLOWER_PORT:-5555}

relay: install
	PROMETHEUS_MULTIPROC_DIR="$${PROMETHEUS_MULTIPROC_DIR:-$(METRICS_DIR)}" \
		$(BIN)/sagas -A config relay

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf var artifacts .pytest_cache .ruff_cache

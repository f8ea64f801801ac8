# Two commands for a new user: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLBUS_TEST_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: install tools test unit integration demo lint schemas docs infra bench bench-peers clean

install: $(STAMP)

# Re-installs only when the dependency list or the pins change. torch goes first, at the
# CPU build constraints.txt pins, so that no other package can pull a newer (CUDA) build.
# The example plugin family goes last, installed as a user's package would be: the tests
# train, promote and serve it through its entry point.
$(STAMP): pyproject.toml constraints.txt examples/mlbus-resnet-family/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mlbus needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -c constraints.txt torch
	$(BIN)/python -m pip install -qq -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -qq --no-deps -e examples/mlbus-resnet-family
	touch $(STAMP)

# kcat (a plain Kafka client) is what the interop tests publish and read with; Debian's
# chromium is what Playwright drives in the /ui browser tests (never `playwright install`,
# which downloads a browser from a CDN); the AsyncAPI parser (npm, under MLBUS_NODE_TOOLS) is
# what validates schemas/asyncapi.yaml; kubectl's kustomize builds infra/k8s; promtool
# (Prometheus's checker, at MLBUS_PROMTOOL) checks every /metrics, the rules and the config. promtool comes out of Debian's prometheus
# package, unpacked rather than installed: the package would pull in a Prometheus server and
# its web assets, and start it.
export MLBUS_NODE_TOOLS ?= $(HOME)/.cache/mlbus/node
ASYNCAPI_PARSER := @asyncapi/parser@3.6.6
export MLBUS_PROMTOOL ?= $(HOME)/.cache/mlbus/bin/promtool

tools:
	@command -v kcat >/dev/null || { apt-get update -qq && apt-get install -y -qq kcat >/dev/null; } \
	  || { echo "kcat is needed by the tests: install it (Debian/Ubuntu: apt-get install kcat)"; exit 1; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "chromium is needed by the /ui browser tests: install it (Debian/Ubuntu: apt-get install chromium)"; exit 1; }
	@{ command -v node >/dev/null && command -v npm >/dev/null; } \
	  || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; } \
	  || { echo "node and npm are needed by the tests: install them (Debian/Ubuntu: apt-get install nodejs npm)"; exit 1; }
	@test -d $(MLBUS_NODE_TOOLS)/node_modules/@asyncapi/parser \
	  || { mkdir -p $(MLBUS_NODE_TOOLS) && npm install -s --no-audit --no-fund \
	       --prefix $(MLBUS_NODE_TOOLS) $(ASYNCAPI_PARSER); } \
	  || { echo "cannot install $(ASYNCAPI_PARSER) from the npm registry into $(MLBUS_NODE_TOOLS)"; exit 1; }
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; } \
	  || { echo "kubectl is needed by the tests (its kustomize builds infra/k8s): install it (Debian/Ubuntu: apt-get install kubernetes-client)"; exit 1; }
	@test -x $(MLBUS_PROMTOOL) || command -v promtool >/dev/null \
	  || { dir=$$(mktemp -d) && cd $$dir && { apt-get download prometheus >/dev/null 2>&1 \
	         || { apt-get update -qq && apt-get download prometheus >/dev/null; }; } \
	       && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool \
	       && mkdir -p $$(dirname $(MLBUS_PROMTOOL)) && mv usr/bin/promtool $(MLBUS_PROMTOOL) \
	       && cd / && rm -rf $$dir; } \
	  || { echo "promtool is needed by the tests: install it (Debian/Ubuntu: apt-get install prometheus) or set MLBUS_PROMTOOL"; exit 1; }

# Three workers on two cores: most tests wait on brokers, subprocesses and sockets, not the
# CPU (each worker has its own session broker, S3 server and PostgreSQL database).
TEST_WORKERS ?= 3

test: install tools
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "unit or integration" -q -n $(TEST_WORKERS)

unit: install
	$(BIN)/python -m pytest -m unit -q

integration: install tools
	$(BIN)/python -m pytest -m integration -q -n $(TEST_WORKERS)

demo: install
	$(BIN)/mlbus demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Type-checks the product code (pyproject.toml's [tool.mypy]); `lint` and `test` run it too.
.PHONY: typecheck
typecheck: install
	$(BIN)/mypy

schemas: install
	$(BIN)/python -m mlbus.schemas.generate

docs: install  ## regenerate the README's configuration reference and service table
	$(BIN)/python -m mlbus.docs

infra: install  ## regenerate infra/'s topics (from the catalog), services and Prometheus scrapes (from the manifests)
	$(BIN)/mlbus topics export --format yaml > infra/kafka/topics.yaml
	$(BIN)/mlbus topics export --format sh > infra/kafka/create-topics.sh
	$(BIN)/mlbus topics export --format strimzi > infra/k8s/topics.yaml
	$(BIN)/mlbus services export --format compose --into infra/docker-compose.yml
	$(BIN)/mlbus services export --format k8s > infra/k8s/services.yaml
	$(BIN)/mlbus services export --format prometheus > infra/prometheus/prometheus.yml

bench: install  ## every benchmark, one table (bench/results/ keeps each report)
	$(BIN)/python bench/run_all.py

# The systems benchmarks compare mlbus with, each in its own environment (never in mlbus's
# dependencies): bench/peers/README.md.
PEERS ?= .bench-peers
$(PEERS)/quix/.installed: bench/peers/requirements-quix.txt
	test -x $(PEERS)/quix/bin/python || $(PYTHON) -m venv $(PEERS)/quix
	$(PEERS)/quix/bin/python -m pip install -qq -r bench/peers/requirements-quix.txt
	touch $@

$(PEERS)/serving/.installed: bench/peers/requirements-serving.txt constraints.txt
	test -x $(PEERS)/serving/bin/python || $(PYTHON) -m venv $(PEERS)/serving
	$(PEERS)/serving/bin/python -m pip install -qq -c constraints.txt -r bench/peers/requirements-serving.txt
	touch $@

$(PEERS)/mlserver/.installed: bench/peers/requirements-mlserver.txt constraints.txt
	test -x $(PEERS)/mlserver/bin/python || $(PYTHON) -m venv $(PEERS)/mlserver
	$(PEERS)/mlserver/bin/python -m pip install -qq -c constraints.txt -r bench/peers/requirements-mlserver.txt
	touch $@

# quixstreams for bench/streams.py; kserve, litserve and MLServer for bench/serving_peers.py
bench-peers: $(PEERS)/quix/.installed $(PEERS)/serving/.installed $(PEERS)/mlserver/.installed

clean:
	rm -rf $(VENV) .mlbus .pytest_cache

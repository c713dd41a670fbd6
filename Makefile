# filepipe — development commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml Cargo.toml $(wildcard rust/*.rs)
	@echo "Building the Rust extension (release) and installing filepipe into $(VENV): the first build"
	@echo "compiles the extension's crates and takes a few minutes (about 6 on a busy 2-core machine);"
	@echo "later ones rebuild only what changed."
	$(PIP) install --quiet -e '.[dev]'
	@touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv, build the extension (release) and install filepipe with dev tools

.PHONY: build-dev
build-dev: $(PY) ## Rebuild the extension in debug mode into .venv
	$(VENV)/bin/maturin develop

.PHONY: build-prod
build-prod: $(PY) ## Rebuild the extension in release mode into .venv
	$(VENV)/bin/maturin develop --release

.PHONY: format
format: install ## Format Python and Rust
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches
	cargo fmt

.PHONY: lint
lint: install ## Lint Python (ruff check and format) and Rust (rustfmt, clippy -D warnings)
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

.PHONY: typecheck
typecheck: install ## mypy --strict on the package, stubtest on the extension
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m mypy.stubtest filepipe._native

.PHONY: test-rust
test-rust: ## Rust unit tests of the pure core (no Python needed)
	cargo test --no-default-features

.PHONY: browser
browser: ## Install Debian's Chromium for the dashboard's browser tests (if missing)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

.PHONY: pgbouncer
pgbouncer: ## Install Debian's PgBouncer for the transaction-pooling tests (if missing)
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || (apt-get update && apt-get install -y pgbouncer)

# The shared script that builds TimescaleDB's Apache-2 edition into the machine's PostgreSQL.
TIMESCALEDB_BUILD ?= ../shared/timescaledb/build.sh

.PHONY: timescaledb
timescaledb: install ## Install TimescaleDB for the hypertable tests if missing (TIMESCALEDB_BUILD: the build script)
	@if [ -n "$$FILEPIPE_TEST_TSDB_URI" ] || $(PY) -c 'import sys; from filepipe.embedded import timescaledb_installed as t; sys.exit(not t())'; then \
	  :; \
	elif [ -x "$(TIMESCALEDB_BUILD)" ]; then \
	  "$(TIMESCALEDB_BUILD)"; \
	else \
	  echo "TimescaleDB is not installed and $(TIMESCALEDB_BUILD) does not exist: set TIMESCALEDB_BUILD=/path/to/build.sh, or FILEPIPE_TEST_TSDB_URI to a server that preloads timescaledb"; \
	  exit 1; \
	fi

.PHONY: test
test: install test-rust browser pgbouncer timescaledb ## Run the whole test suite (Rust core, then pytest; benches run once, unmeasured)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: bench
bench: install ## Measure: pytest-benchmark groups, the end-to-end table (artifacts/bench-e2e.md), a Rust peer on the same events (artifacts/peer.md), a drain behind 20 ms round trips, each process's and stage's share (artifacts/e2e-breakdown.txt), where the CPU goes (artifacts/profile.md)
	cargo test --release --no-default-features -- --ignored
	FILEPIPE_BENCH_FULL=1 $(VENV)/bin/pytest benches --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,ops,rounds $(PYTEST_ARGS)
	$(PY) -m benches.e2e
	$(PY) -m benches.peer
	$(PY) -m benches.latency
	set -o pipefail; mkdir -p artifacts && $(PY) -m benches.e2e_breakdown --private --runs 3 --pool-sizes 1,2 | tee artifacts/e2e-breakdown.txt
	$(PY) -m benches.profile --events 1000000

.PHONY: demo
demo: install ## Run the pipeline end to end on sample files (throwaway Redis/PostgreSQL unless configured)
	$(VENV)/bin/filepipe demo

.PHONY: clean
clean: ## Remove build output and the virtualenv
	rm -rf target $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
	find python -name '*.so' -delete

# make test: everything CI runs, from a fresh clone with only Python 3.11 (also as root).
# Tests use KERNEL_TEST_DSN when set (a superuser DSN), else an embedded PostgreSQL (pgserver).

VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(VENV)/bin
# Reinstall when the dependencies change; otherwise `make venv` costs nothing.
STAMP := $(VENV)/.installed

.PHONY: venv lint schema migration test test-slow demo test-kernel freeze bench bench-smoke bench-deps screenshots soak

venv: $(STAMP)

# __init__.py holds the version, which the installed metadata must follow (test_freeze checks).
$(STAMP): pyproject.toml kernel_driver/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# SQL with sqlfluff; Python with ruff and mypy --strict (configured in pyproject.toml).
# No `ruff format --check`: the formatter would rewrite 83 of the 119 Python files (~2,800 lines).
lint: venv
	$(BIN)/sqlfluff lint sql/
	$(BIN)/ruff check kernel_driver bench tests
	$(BIN)/mypy kernel_driver bench

# Migrate a scratch database and write the reviewable snapshot (commit it with the migration).
schema: venv
	$(BIN)/python -m kernel_driver.schema_dump --output sql/schema.sql \
		$(if $(KERNEL_TEST_DSN),--server "$(KERNEL_TEST_DSN)")

# Start the next migration with its version bump and ledger row in place (sql/README.md).
migration: venv
	@test -n "$(NAME)" -a -n "$(VERSION)" || { echo "usage: make migration NAME=slug VERSION=X.Y.Z" >&2; exit 2; }
	$(BIN)/python -m kernel_driver.scaffold "$(NAME)" "$(VERSION)"

test: venv lint
	$(BIN)/pytest -m "not slow"

# The long runs: the scale test with a million contacts (make test runs it with 50,000).
test-slow: venv
	KERNEL_TEST_SCALE_CONTACTS=1000000 $(BIN)/pytest tests/integration/test_scale.py

# The soak (issue 12, docs/reliability.md): DURATION seconds of campaigns under random faults
# on a cluster of its own, then every invariant; 24 hours: make soak DURATION=86400.
DURATION ?= 120
soak: venv
	$(BIN)/python -m tests.soak.run --duration $(DURATION) $(if $(SOAK_REPORT),--report $(SOAK_REPORT))

# The console's screenshots in docs/img (README), made by its browser test in Debian's Chromium.
screenshots: venv
	KERNEL_TEST_SCREENSHOTS=docs/img $(BIN)/pytest tests/console/test_browser.py

# The whole kernel on this machine: KERNEL_DSN, else an embedded PostgreSQL kept in .demo/.
demo: venv
	$(BIN)/kernel-driver demo

# The seed's test:kernel, required for any change to a frozen file: the kernel's own tests and
# the freeze gate (docs/EXECUTION_KERNEL_FREEZE.md).
test-kernel: venv
	$(BIN)/pytest tests/sql tests/migrations
	$(BIN)/kernel-driver freeze check

# After a frozen file changed and a new migration bumped kernel_version(): certify in a scratch
# database into evidence/<version>.json, then rewrite freeze/manifest.json.
freeze: venv
	$(BIN)/kernel-driver $(if $(KERNEL_TEST_DSN),--dsn "$(KERNEL_TEST_DSN)") freeze certify
	$(BIN)/kernel-driver freeze update

# The benchmark (issue 8, item 6; docs/benchmarks.md): never part of `make test`. Its peers
# (procrastinate, graphile-worker, pg-boss), matplotlib and py-spy live only in .bench/venv and
# bench/peers/node/node_modules. Postgres: KERNEL_BENCH_DSN, else KERNEL_TEST_DSN, else local.
BENCH_VENV := .bench/venv
BENCH_STAMP := $(BENCH_VENV)/.installed
NODE_STAMP := bench/peers/node/node_modules/.installed

bench-deps: $(BENCH_STAMP) $(NODE_STAMP)

$(BENCH_STAMP): bench/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt -e '.[testing,ui]'
	touch $@

$(NODE_STAMP): bench/peers/node/package.json bench/peers/node/package-lock.json
	cd bench/peers/node && npm ci --no-audit --no-fund --silent
	touch $@

# The long run (an estimated 15–30 minutes here, mostly the 1,000,000-contact campaign): writes bench/results/latest.json, the generated section
# of docs/benchmarks.md and docs/img/benchmarks.png.
bench: bench-deps
	$(BENCH_VENV)/bin/python -m bench run

# What CI runs: small sizes, everything written to a temporary directory.
bench-smoke: bench-deps
	$(BENCH_VENV)/bin/python -m bench run --smoke

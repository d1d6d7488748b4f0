# make test: everything CI runs, from a fresh clone with only Python 3.11 (also as root).
# Tests use KERNEL_TEST_DSN when set (a superuser DSN), else an embedded PostgreSQL (pgserver).

VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(VENV)/bin
# Reinstall when the dependencies change; otherwise `make venv` costs nothing.
STAMP := $(VENV)/.installed

.PHONY: venv lint schema test test-slow demo test-kernel freeze

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

lint: venv
	$(BIN)/sqlfluff lint sql/

# Migrate a scratch database and write the reviewable snapshot (commit it with the migration).
schema: venv
	$(BIN)/python -m kernel_driver.schema_dump --output sql/schema.sql \
		$(if $(KERNEL_TEST_DSN),--server "$(KERNEL_TEST_DSN)")

test: venv lint
	$(BIN)/pytest -m "not slow"

# The long runs: the scale test with a million contacts (make test runs it with 50,000).
test-slow: venv
	KERNEL_TEST_SCALE_CONTACTS=1000000 $(BIN)/pytest tests/integration/test_scale.py

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

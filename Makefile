# make test: everything CI runs, from a fresh clone with only Python 3.11 (also as root).
# Tests use KERNEL_TEST_DSN when set (a superuser DSN), else an embedded PostgreSQL (pgserver).

VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(VENV)/bin
# Reinstall when the dependencies change; otherwise `make venv` costs nothing.
STAMP := $(VENV)/.installed

.PHONY: venv lint schema test test-slow

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

lint: venv
	$(BIN)/sqlfluff lint sql/migrations

# Migrate a scratch database and write the reviewable snapshot (commit it with the migration).
schema: venv
	$(BIN)/python -m kernel_driver.schema_dump --output sql/schema.sql \
		$(if $(KERNEL_TEST_DSN),--server "$(KERNEL_TEST_DSN)")

test: venv lint
	$(BIN)/pytest -m "not slow"

test-slow: venv
	$(BIN)/pytest -m slow

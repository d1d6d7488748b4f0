"""Fixtures for the SQL-level kernel tests: one database per module, emptied after each test.

tests/conftest.py gives every test a fresh clone of the migrated template (``db_dsn``). A clone
costs 0.1-0.3 s (more on a busy server), which for ~200 tests is most of this directory's run
time. Here ``db_dsn`` is instead the module's own clone, emptied of every row a test wrote once
that test's connections (from ``connect``/``conn``, which close first) are gone. Everything else
a test changes lives in its sessions (SET SESSION AUTHORIZATION, settings, LISTEN) and dies
with them. The clones are dropped after each module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.sql.helpers import assert_item_counts_exact

# Every table that tests write to, in an order DELETE can empty them in (state_transitions and
# schema_migrations hold the migration's own rows and are left alone).
DATA_TABLES = (
    "job_item_counts", "channel_outbox", "job_events", "job_queue", "campaign_runs", "rate_buckets",
    "campaign_audience", "provider_configs", "contacts", "campaigns", "workspaces",
)


@pytest.fixture(scope="module")
def module_database(cluster: Any, kernel_template: Any) -> Iterator[str]:
    """A clone of the migrated template for one test module."""
    with cluster.database(template=kernel_template.database) as dsn:
        yield dsn


@pytest.fixture
def db_dsn(module_database: str, kernel_schema: str) -> Iterator[str]:
    """The module's database, emptied after the test (see the module docstring)."""
    yield module_database
    assert_item_counts_exact(module_database, kernel_schema)
    with psycopg.connect(module_database, autocommit=True) as admin:
        admin.execute("SET lock_timeout = '10s'")  # a leaked session holding locks fails loudly
        with admin.transaction():
            for table in DATA_TABLES:
                if admin.execute("SELECT to_regclass(%s) IS NULL", [f"{kernel_schema}.{table}"]).fetchone()[0]:
                    continue  # an older kernel (KERNEL_TEST_SQL_DIR) lacks it
                admin.execute(
                    sql.SQL("DELETE FROM {}.{}").format(sql.Identifier(kernel_schema), sql.Identifier(table))
                )

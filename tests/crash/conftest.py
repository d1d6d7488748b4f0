from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from kernel_driver import migrate
from kernel_driver.testing.postgres import embedded_postgres


@pytest.fixture
def own_cluster() -> Iterator[str]:
    """A PostgreSQL server of the test's own, with the kernel: the test may crash it."""
    with embedded_postgres() as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            list(migrate.migrate(conn, "kernel", migrate.load_migrations()))
        yield dsn

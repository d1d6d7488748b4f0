"""Real PostgreSQL for every test, without mocks.

The server is ``KERNEL_TEST_DSN`` when set (a superuser DSN; CI uses its PostgreSQL 15), else an
embedded PostgreSQL 16 started by pgserver in a temporary directory (the system ``initdb`` refuses
to run as root; pgserver does not). Once per session the kernel is migrated into a template
database under a random schema ``kt_<8 hex>`` (proving ``--schema``, and keeping this run's
cluster-global roles ``kt_…_owner/_worker/_app/_reader`` apart from every other run); each test
gets its own clone. At the end the session drops every database it created, then those roles.

``KERNEL_TEST_SQL_DIR`` runs the suite against another ``sql/`` directory (default: the checkout's).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from kernel_driver import db, migrate
from kernel_driver.cli import main

# The driver reads KERNEL_DSN, KERNEL_SCHEMA, …: a developer's shell must not steer the tests.
for _name in list(os.environ):
    if _name.startswith("KERNEL_") and not _name.startswith("KERNEL_TEST_"):
        del os.environ[_name]


class Cluster:
    """The test server: creates databases, and drops each at the latest when the session ends."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.admin = db.connect(server_dsn, autocommit=True)
        self.databases: list[str] = []

    def dsn(self, database: str) -> str:
        return db.dsn_for_database(self.server_dsn, database)

    def create_database(self, template: str = "template0") -> str:
        name = f"kt_{secrets.token_hex(4)}"
        db.create_database(self.admin, name, template)
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        db.drop_database(self.admin, name)
        self.databases.remove(name)

    def close(self) -> None:
        for name in list(self.databases):
            self.drop_database(name)
        self.admin.close()


@pytest.fixture(scope="session")
def sql_dir() -> Path:
    """The ``sql/`` directory under test."""
    override = os.environ.get("KERNEL_TEST_SQL_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "sql"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    with db.postgres_server(os.environ.get("KERNEL_TEST_DSN")) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def kernel_template(server_dsn: str, sql_dir: Path) -> Iterator[migrate.ScratchKernel]:
    """The kernel migrated once per session; its roles are dropped with it, after the cluster
    fixture (which depends on this one, so ends first) dropped every other database."""
    with migrate.scratch_kernel(server_dsn, sql_dir) as scratch:
        yield scratch


@pytest.fixture(scope="session")
def cluster(server_dsn: str, kernel_template: migrate.ScratchKernel) -> Iterator[Cluster]:
    cluster = Cluster(server_dsn)
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def kernel_schema(kernel_template: migrate.ScratchKernel) -> str:
    return kernel_template.schema


@pytest.fixture
def db_dsn(cluster: Cluster, kernel_template: migrate.ScratchKernel) -> Iterator[str]:
    """A fresh database with the kernel installed, cloned from the session's template."""
    name = cluster.create_database(template=kernel_template.database)
    yield cluster.dsn(name)
    cluster.drop_database(name)


@pytest.fixture
def empty_db_dsn(cluster: Cluster) -> Iterator[str]:
    """A fresh database without the kernel (migrate it with ``kernel_schema``: those roles exist
    already and are dropped at the end of the session)."""
    name = cluster.create_database()
    yield cluster.dsn(name)
    cluster.drop_database(name)


@pytest.fixture
def connect(db_dsn: str, kernel_schema: str) -> Iterator[Callable[..., psycopg.Connection]]:
    """Open more connections to the test database (autocommit, kernel schema on the path)."""
    opened: list[psycopg.Connection] = []

    def open_connection(**kwargs: Any) -> psycopg.Connection:
        options = {"autocommit": True, "options": f"-c search_path={kernel_schema},public"}
        conn = psycopg.connect(db_dsn, **{**options, **kwargs})
        opened.append(conn)
        return conn

    yield open_connection
    for conn in opened:
        conn.close()


@pytest.fixture
def conn(connect: Callable[..., psycopg.Connection]) -> psycopg.Connection:
    """An autocommit connection to a fresh kernel database; functions callable unqualified."""
    return connect()


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run ``kernel-driver ARGS…`` in-process; bugs surface as tracebacks, not exit codes."""
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke

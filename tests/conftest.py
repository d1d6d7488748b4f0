"""Real PostgreSQL for every test, without mocks.

The server is ``KERNEL_TEST_DSN`` when set (a superuser DSN; CI uses its PostgreSQL 15), else an
embedded PostgreSQL 16 started by pgserver in a temporary directory (the system ``initdb`` refuses
to run as root; pgserver does not). Once per session the kernel is migrated into a template
database under a random schema ``kt_<8 hex>`` (proving ``--schema``, and keeping this run's
cluster-global roles ``kt_…_owner/_worker/_app/_reader`` apart from every other run); each test
gets its own clone (pytest-postgresql's DatabaseJanitor makes and drops it). At the end the session
drops the template, then those roles.

``KERNEL_TEST_SQL_DIR`` runs the suite against another ``sql/`` directory (default: the checkout's).

Imports: a test module imports shared helpers absolutely, ``from tests.<directory>.<module> import …``
(tests/ and every directory in it are packages, so pytest puts the checkout on ``sys.path``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql.janitor import DatabaseJanitor

from kernel_driver import db, migrate
from kernel_driver.cli import main
from tests.sql.helpers import assert_item_counts_exact

# The driver reads KERNEL_DSN, KERNEL_SCHEMA, …: a developer's shell must not steer the tests.
for _name in list(os.environ):
    if _name.startswith("KERNEL_") and not _name.startswith("KERNEL_TEST_"):
        del os.environ[_name]


class Cluster:
    """The test server. Databases come and go through pytest-postgresql's DatabaseJanitor (it
    creates one, from a template when asked, and drops it after ending its sessions)."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        params = conninfo_to_dict(server_dsn)
        self.janitor_args = {
            "user": params.get("user") or "postgres",
            "host": params.get("host") or "127.0.0.1",
            "port": params.get("port") or 5432,
            "password": params.get("password"),
            "maintenance_dbname": params.get("dbname") or "postgres",
        }

    def dsn(self, database: str) -> str:
        return db.dsn_for_database(self.server_dsn, database)

    @contextmanager
    def database(self, template: str | None = None) -> Iterator[str]:
        """A new database (a clone of ``template`` when given) for the duration; its DSN."""
        janitor = DatabaseJanitor(dbname=f"kt_{secrets.token_hex(4)}", template_dbname=template, **self.janitor_args)
        janitor.init()
        try:
            yield self.dsn(janitor.dbname)
        finally:
            janitor.drop()


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
def cluster(server_dsn: str, kernel_template: migrate.ScratchKernel) -> Cluster:
    return Cluster(server_dsn)


@pytest.fixture(scope="session")
def kernel_schema(kernel_template: migrate.ScratchKernel) -> str:
    return kernel_template.schema


@pytest.fixture
def db_dsn(cluster: Cluster, kernel_template: migrate.ScratchKernel) -> Iterator[str]:
    """A fresh database with the kernel installed, cloned from the session's template."""
    with cluster.database(template=kernel_template.database) as dsn:
        yield dsn
        assert_item_counts_exact(dsn, kernel_template.schema)


@pytest.fixture
def empty_db_dsn(cluster: Cluster) -> Iterator[str]:
    """A fresh database without the kernel (migrate it with ``kernel_schema``: those roles exist
    already and are dropped at the end of the session)."""
    with cluster.database() as dsn:
        yield dsn


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

    def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
        return runner.invoke(main, list(args), env=env, input=input, catch_exceptions=False)

    return invoke

"""Discover the SQL migrations, verify them against the database's ledger, apply the pending ones.

Migrations are ``sql/migrations/NNNN_slug.sql``: numbered from 0001 without gaps, append-only,
written for the schema ``kernel`` literally so that ``psql -1 -v ON_ERROR_STOP=1 -f`` applies
them in order. Each file records itself in ``kernel.schema_migrations`` (its last statement);
the driver adds the file's sha256, so that an applied file changed afterwards is refused.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg
from psycopg import sql

from kernel_driver import db
from kernel_driver.config import DEFAULT_SCHEMA, check_schema_name
from kernel_driver.db import wrap_errors

ROLE_SUFFIXES = ("_owner", "_worker", "_app", "_reader", "_operator")
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
FROZEN = "the kernel is frozen: put the change in a new migration"


class MigrationRefused(Exception):
    """The migration files and the database disagree; the migration at fault was not applied
    (and when found before migrating, nothing was)."""


class MigrationFailed(Exception):
    """A statement of a migration failed; that migration's transaction was rolled back."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without ".sql", e.g. "0001_kernel"
    text: str
    sha256: str  # of the file's bytes as stored, before any schema renaming


@dataclass(frozen=True)
class LedgerRow:
    version: int
    name: str
    sha256: str | None  # NULL when the file was applied without the driver (psql)
    applied_at: datetime


@dataclass(frozen=True)
class Entry:
    """One version as seen from both sides: the files and the ledger."""

    version: int
    name: str
    state: str  # ok | pending | unverified | mismatch | renamed | no file
    applied_at: datetime | None = None
    file_name: str | None = None
    file_sha256: str | None = None
    ledger_sha256: str | None = None

    def problem(self) -> str | None:
        """Why this entry makes migrating unsafe, or None."""
        if self.state == "mismatch":
            return (
                f"{self.name}.sql was changed after it was applied: the database recorded "
                f"sha256 {self.ledger_sha256}, the file now has sha256 {self.file_sha256}; "
                f"{FROZEN}"
            )
        if self.state == "renamed":
            return (
                f"version {self.version} was applied as {self.name}.sql but its file is now "
                f"{self.file_name}.sql; {FROZEN}"
            )
        if self.state == "no file":
            return (
                f"the database has migration {self.name} (version {self.version}) but there is "
                "no such file: use a kernel-driver at least as new as the database"
            )
        return None


def schema_roles(schema: str) -> list[str]:
    """The cluster-global roles a kernel installed in ``schema`` creates."""
    return [schema + suffix for suffix in ROLE_SUFFIXES]


def rename_schema(text: str, to: str, source: str = DEFAULT_SCHEMA) -> str:
    """Rewrite the schema name where it is an identifier, and its roles: ``kernel.x`` → ``to.x``,
    ``SCHEMA kernel`` → ``SCHEMA to``, ``kernel_app`` → ``to_app``. Prose stays as written
    ("the kernel", "kernel-driver migrate"), and so do longer identifiers (``kernel_version``,
    ``execution_kernel.tenant_id``).
    """
    if to == source:
        return text
    name = re.escape(source)
    suffixes = "|".join(ROLE_SUFFIXES)
    pattern = re.compile(
        rf"\b{name}(?P<role>{suffixes})\b"  # a role
        rf"|\b{name}(?=\.[A-Za-z_\"])"  # a qualified name
        rf"|(?<=SCHEMA )\b{name}\b",  # the schema itself (one space: how the migrations write it)
    )
    return pattern.sub(lambda m: to + (m.group("role") or ""), text)


def sql_root(sql_dir: str | Path | None = None) -> Traversable:
    """The ``sql/`` directory: ``sql_dir`` if given, else the installed package's copy, else the
    checkout's (an editable install has no packaged copy)."""
    if sql_dir is not None:
        return Path(sql_dir)
    packaged = resources.files("kernel_driver").joinpath("sql")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations(sql_dir: str | Path | None = None) -> list[Migration]:
    """Read every migration file, refusing misnamed files and gaps or duplicates in numbering."""
    folder = sql_root(sql_dir).joinpath("migrations")
    if not folder.is_dir():
        raise MigrationRefused(f"no migrations directory at {folder}")
    migrations = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = MIGRATION_FILE.match(entry.name)
        if match is None:
            raise MigrationRefused(
                f"{entry.name}: migration files must be named NNNN_slug.sql "
                "(four digits, lowercase slug)"
            )
        data = entry.read_bytes()
        migrations.append(
            Migration(
                version=int(match.group(1)),
                name=entry.name.removesuffix(".sql"),
                text=data.decode("utf-8"),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    migrations.sort(key=lambda m: (m.version, m.name))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationRefused(
                f"migration numbering must run 0001, 0002, … without gaps or duplicates: "
                f"expected {expected:04d}, found {migration.name}.sql in {folder}"
            )
    if not migrations:
        raise MigrationRefused(f"no migration files in {folder}")
    return migrations


def _ledger_table(schema: str) -> sql.Composed:
    return sql.SQL("{}.schema_migrations").format(sql.Identifier(schema))


def read_ledger(conn: psycopg.Connection, schema: str) -> dict[int, LedgerRow]:
    """The applied migrations; empty when the kernel is not installed in ``schema`` yet."""
    # Asked of the catalog tables, not with to_regclass(): that goes through the backend's
    # catalog cache, which a transaction that waited for the lock may hold stale (it would miss
    # a ledger created meanwhile by the migrator it waited for). A query sees every commit.
    exists = conn.execute(
        """
        SELECT EXISTS (
            SELECT FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %s AND c.relname = 'schema_migrations'
        )
        """,
        [schema],
    ).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT version, name, sha256, applied_at FROM {} ORDER BY version").format(
            _ledger_table(schema)
        )
    ).fetchall()
    return {row[0]: LedgerRow(*row) for row in rows}


def compare(migrations: Sequence[Migration], ledger: dict[int, LedgerRow]) -> list[Entry]:
    """Pair each file with its ledger row, by version."""
    files = {m.version: m for m in migrations}
    entries = []
    for version in sorted(files.keys() | ledger.keys()):
        file, row = files.get(version), ledger.get(version)
        if row is None:
            assert file is not None
            entries.append(
                Entry(version, file.name, "pending", file_name=file.name, file_sha256=file.sha256)
            )
            continue
        if file is None:
            state = "no file"
        elif file.name != row.name:
            state = "renamed"
        elif row.sha256 is None:
            state = "unverified"
        elif row.sha256 == file.sha256:
            state = "ok"
        else:
            state = "mismatch"
        entries.append(
            Entry(
                version,
                row.name,
                state,
                applied_at=row.applied_at,
                file_name=file.name if file else None,
                file_sha256=file.sha256 if file else None,
                ledger_sha256=row.sha256,
            )
        )
    return entries


@dataclass(frozen=True)
class Plan:
    adopt: list[Migration]  # applied without the driver: their sha256 is to be recorded
    pending: list[Migration]


def plan(conn: psycopg.Connection, schema: str, migrations: Sequence[Migration]) -> Plan:
    """What migrating would do; raises MigrationRefused if any applied file was changed."""
    entries = compare(migrations, read_ledger(conn, schema))
    problems = [p for p in (e.problem() for e in entries) if p]
    if problems:
        raise MigrationRefused("; ".join(problems))
    by_version = {m.version: m for m in migrations}
    return Plan(
        adopt=[by_version[e.version] for e in entries if e.state == "unverified"],
        pending=[by_version[e.version] for e in entries if e.state == "pending"],
    )


def _lock(conn: psycopg.Connection, schema: str) -> None:
    """Serialise migrators of one schema until the transaction ends."""
    digest = hashlib.sha256(f"kernel_driver.migrate:{schema}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", [key])


def _record_sha256(conn: psycopg.Connection, schema: str, migration: Migration) -> int:
    return conn.execute(
        sql.SQL("UPDATE {} SET sha256 = %s WHERE version = %s AND sha256 IS NULL").format(
            _ledger_table(schema)
        ),
        [migration.sha256, migration.version],
    ).rowcount


def adopt(conn: psycopg.Connection, schema: str, migrations: Sequence[Migration]) -> None:
    """Record the sha256 of migrations that were applied without the driver (with psql)."""
    with conn.transaction():
        _lock(conn, schema)
        for migration in migrations:
            _record_sha256(conn, schema, migration)


def apply(conn: psycopg.Connection, schema: str, migration: Migration) -> bool:
    """Apply one migration in its own transaction; False if another migrator applied it first.

    ``conn`` must be in autocommit mode (the transaction here is the only one).
    """
    with conn.transaction():
        _lock(conn, schema)
        if migration.version in read_ledger(conn, schema):
            return False
        try:
            with wrap_errors():
                conn.execute(rename_schema(migration.text, schema))
        except psycopg.Error as exc:
            reason = exc.diag.message_primary or str(exc)
            raise MigrationFailed(
                f"{migration.name}.sql failed and was rolled back: {reason} "
                f"(SQLSTATE {exc.diag.sqlstate})"
            ) from exc
        if _record_sha256(conn, schema, migration) != 1:
            raise MigrationRefused(
                f"{migration.name}.sql did not record itself in {schema}.schema_migrations; "
                "every migration must end with INSERT INTO kernel.schema_migrations "
                f"(version, name) VALUES ({migration.version}, '{migration.name}') "
                "ON CONFLICT (version) DO NOTHING"
            )
    return True


def migrate(
    conn: psycopg.Connection, schema: str, migrations: Sequence[Migration]
) -> Iterator[tuple[str, Migration]]:
    """Adopt and apply what is pending, yielding ("adopted" | "applied" | "skipped", migration)
    as each step commits ("skipped": a concurrent migrator applied it first)."""
    check_schema_name(schema)
    todo = plan(conn, schema, migrations)
    if todo.adopt:
        adopt(conn, schema, todo.adopt)
        for migration in todo.adopt:
            yield "adopted", migration
    for migration in todo.pending:
        yield ("applied" if apply(conn, schema, migration) else "skipped"), migration


def kernel_version(conn: psycopg.Connection, schema: str) -> str | None:
    """What ``schema.kernel_version()`` reports; None when the kernel is not installed."""
    found = conn.execute(
        "SELECT to_regprocedure(format('%%I.kernel_version()', %s::text)) IS NOT NULL", [schema]
    ).fetchone()
    if not found or not found[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT {}.kernel_version()").format(sql.Identifier(schema))
    ).fetchone()
    return None if row is None else str(row[0])


def status(
    conn: psycopg.Connection, schema: str, migrations: Sequence[Migration]
) -> tuple[list[Entry], str | None]:
    """Every version with its state, and the installed kernel version."""
    return compare(migrations, read_ledger(conn, schema)), kernel_version(conn, schema)


@dataclass(frozen=True)
class ScratchKernel:
    database: str
    dsn: str
    schema: str


@contextmanager
def scratch_kernel(server_dsn: str, sql_dir: str | Path | None = None) -> Iterator[ScratchKernel]:
    """A new database on ``server_dsn`` with the kernel migrated into a random schema ``kt_…``
    (so that its cluster-global roles collide with no other install); dropped after, roles too.
    """
    name = f"kt_{secrets.token_hex(4)}"  # for the database and the schema
    scratch = ScratchKernel(name, db.dsn_for_database(server_dsn, name), name)
    with db.connect(server_dsn, autocommit=True) as admin:
        db.create_database(admin, scratch.database)
        try:
            with db.connect(scratch.dsn, autocommit=True) as conn:
                for _ in migrate(conn, scratch.schema, load_migrations(sql_dir)):
                    pass
            yield scratch
        finally:
            db.drop_database(admin, scratch.database)
            db.drop_roles(admin, schema_roles(scratch.schema))

"""The migration tests' workbench: an empty database, the session's schema, a private copy of
the sql/ directory to extend or tamper with, and the CLI pointed at all three."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result

from kernel_driver import db, migrate


@dataclass
class Bench:
    cli: Callable[..., Result]
    dsn: str  # an empty database
    schema: str
    sql: Path  # a copy of sql/

    def migrate(self, *args: str) -> Result:
        """``kernel-driver --dsn DSN --schema SCHEMA migrate --sql-dir SQL ARGS…``"""
        return self.cli(
            "--dsn", self.dsn, "--schema", self.schema, "migrate", "--sql-dir", str(self.sql), *args
        )

    def files(self) -> list[migrate.Migration]:
        return migrate.load_migrations(self.sql)

    def add(self, slug: str, body: str, *, record: bool = True) -> str:
        """Append the next migration, NNNN_<slug>.sql, and return its name. With ``record`` it
        ends, as every migration must, by recording itself in the ledger."""
        version = len(self.files()) + 1
        name = f"{version:04d}_{slug}"
        if record:
            body += (
                "\nINSERT INTO kernel.schema_migrations (version, name) "
                f"VALUES ({version}, '{name}')\nON CONFLICT (version) DO NOTHING;\n"
            )
        (self.sql / "migrations" / f"{name}.sql").write_text(body)
        return name

    def edit_first(self) -> Path:
        """Change the first migration the most innocent way: an editor adds a final newline."""
        first = min((self.sql / "migrations").glob("*.sql"))
        first.write_bytes(first.read_bytes() + b"\n")
        return first

    def ledger(self) -> dict[int, migrate.LedgerRow]:
        with db.connect(self.dsn, autocommit=True) as conn:
            return migrate.read_ledger(conn, self.schema)

    def exists(self, table: str) -> bool:
        with db.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                [self.schema, table],
            ).fetchone()
        return bool(row and row[0])


@pytest.fixture
def bench(
    cli: Callable[..., Result], empty_db_dsn: str, kernel_schema: str, sql_dir: Path, tmp_path: Path
) -> Bench:
    copy = tmp_path / "sql"
    shutil.copytree(sql_dir / "migrations", copy / "migrations")
    return Bench(cli, empty_db_dsn, kernel_schema, copy)

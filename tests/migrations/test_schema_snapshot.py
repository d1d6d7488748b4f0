"""sql/schema.sql is the committed, reviewable snapshot of what the migrations install."""

from __future__ import annotations

import difflib
from pathlib import Path

import psycopg

from kernel_driver import schema_dump


def test_committed_schema_matches_the_migrations(
    conn: psycopg.Connection, kernel_schema: str, sql_dir: Path
) -> None:
    fresh = schema_dump.dump(conn, kernel_schema)
    snapshot = sql_dir / "schema.sql"
    committed = snapshot.read_text() if snapshot.exists() else ""
    if fresh != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                "sql/schema.sql (committed)",
                "fresh dump of the migrations",
                n=1,
            )
        )
        raise AssertionError(f"sql/schema.sql is out of date: run `make schema`\n{diff[:4000]}")


def test_dump_names_the_schema_kernel_whatever_it_was_installed_as(
    conn: psycopg.Connection, kernel_schema: str
) -> None:
    text = schema_dump.dump(conn, kernel_schema)
    assert kernel_schema != "kernel" and kernel_schema not in text
    assert "CREATE SCHEMA kernel AUTHORIZATION kernel_owner;" in text

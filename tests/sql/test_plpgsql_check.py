"""Every PL/pgSQL body passes plpgsql_check (where the extension can be installed).

sqlfluff lints the DDL only; function bodies are strings to it. plpgsql_check compiles each body
against the real schema: unknown columns, type mismatches, unused or unassigned variables.
"""

from __future__ import annotations

import pytest

from tests.sql.helpers import rows


def test_every_plpgsql_function_passes_plpgsql_check(conn, kernel_schema):
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone():
        pytest.skip("plpgsql_check is not installed on this server (.ci/run installs it for PostgreSQL 15)")
    conn.execute("CREATE EXTENSION IF NOT EXISTS plpgsql_check")
    findings = rows(
        conn,
        """SELECT p.oid::regprocedure::text AS function, c.lineno, c.level, c.message
           FROM pg_proc AS p
           LEFT JOIN LATERAL (
               -- a trigger with both transition tables when there is one: its body sees them all
               SELECT t.tgrelid, t.tgoldtable, t.tgnewtable FROM pg_trigger AS t
               WHERE t.tgfoid = p.oid AND NOT t.tgisinternal
               ORDER BY t.tgoldtable IS NULL, t.tgnewtable IS NULL LIMIT 1
           ) AS t ON TRUE
           CROSS JOIN LATERAL plpgsql_check_function_tb(
               p.oid::regprocedure, coalesce(t.tgrelid, 0), oldtable => t.tgoldtable, newtable => t.tgnewtable
           ) AS c
           WHERE p.pronamespace = %s::regnamespace
             AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpgsql')""",
        [kernel_schema],
    )
    assert findings == []

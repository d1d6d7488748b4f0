"""A database login without the kernel's roles (issue 12, item 3: wrong permissions): every
command ends with one line saying which role to grant, exit 6, never a traceback."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from kernel_driver.errors import ExitCode

ZERO = "00000000-0000-0000-0000-000000000001"


@pytest.fixture
def no_role_dsn(conn, db_dsn, kernel_schema):
    user = f"{kernel_schema}_nobody"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user)))
    try:
        yield psycopg.conninfo.make_conninfo(db_dsn, user=user)
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


@pytest.mark.parametrize("command", [
    ["runs", "list"], ["runs", "show", ZERO], ["deploy", ZERO], ["campaigns", "check", ZERO, "--workspace", ZERO],
    ["run", "--until-idle"], ["migrate", "--status"],
])
def test_a_login_without_the_kernel_roles_is_told_which_to_grant(cli, no_role_dsn, kernel_schema, command):
    result = cli("--dsn", no_role_dsn, "--schema", kernel_schema, *command)
    assert result.exit_code == ExitCode.DATABASE_ERROR, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: permission denied") and f"GRANT {kernel_schema}_worker (run)" in line, line
    assert "LINE 1" not in line  # the reason, not the SQL it ran

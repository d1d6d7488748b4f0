"""The CLI against a kernel of another version than the driver's (issue 12, item 3): a newer
minor version works (rolling upgrades: the DBA migrates first), named in one warning line; an
older kernel or another major version is refused in one line saying what to do, exit 6, before
anything is written; `migrate` refuses a database that has migrations this driver lacks, exit 3."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from kernel_driver import __version__
from kernel_driver.compatibility import KernelMismatch, check_kernel, version_tuple
from kernel_driver.errors import ExitCode
from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign

MAJOR, MINOR, _ = version_tuple(__version__)
NEWER_MINOR = f"{MAJOR}.{MINOR + 1}.0"
NEWER_MAJOR = f"{MAJOR + 1}.0.0"
OLDER = f"{MAJOR}.{MINOR - 1}.0"


def pretend_kernel_version(conn: psycopg.Connection, schema: str, version: str) -> None:
    """As a later migration would: kernel_version() now reports `version`."""
    conn.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}.kernel_version() RETURNS text LANGUAGE sql AS {}").format(
        sql.Identifier(schema), sql.Literal(f"SELECT '{version}'::text")))


def runs_of(conn: psycopg.Connection, schema: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}.campaign_runs").format(sql.Identifier(schema))).fetchone()[0]


@pytest.mark.parametrize(("found", "expected"), [
    (__version__, None),
    (NEWER_MINOR, "newer than this kernel-driver"),
    (f"{MAJOR}.{MINOR}.7", "newer than this kernel-driver"),
])
def test_this_and_newer_minor_versions_are_accepted(found, expected):
    warning = check_kernel(found, "kernel")
    assert warning is None if expected is None else expected in warning


@pytest.mark.parametrize(("found", "expected"), [
    (None, "no kernel in schema kernel: run kernel-driver migrate first"),
    (OLDER, f"kernel {OLDER} in schema kernel is older than this kernel-driver"),
    (NEWER_MAJOR, f"install kernel-driver {MAJOR + 1}.x"),
])
def test_no_older_or_other_major_kernel_is_refused(found, expected):
    with pytest.raises(KernelMismatch, match=expected):
        check_kernel(found, "kernel")


def test_a_newer_minor_kernel_runs_with_one_warning(cli, conn, db_dsn, kernel_schema):
    seeded = seed_campaign(conn, kernel_schema, contacts=5, provider="noop")
    pretend_kernel_version(conn, kernel_schema, NEWER_MINOR)
    deployed = cli("--dsn", db_dsn, "--schema", kernel_schema, "deploy", str(seeded.campaign_id), "--json")
    assert deployed.exit_code == 0, deployed.output
    warning, _ = deployed.output.splitlines()
    assert warning == (f"warning: kernel {NEWER_MINOR} in schema {kernel_schema} is newer than this kernel-driver"
                       f" ({__version__}): it keeps every {MAJOR}.x function this driver calls; upgrade the driver"
                       f" to use what {NEWER_MINOR} adds")
    daemon = cli("--dsn", db_dsn, "--schema", kernel_schema, "run", "--until-idle", "--poll-interval", "0.1")
    assert daemon.exit_code == 0, daemon.output
    assert daemon.output.startswith(f"warning: kernel {NEWER_MINOR}")
    (run,) = Kernel(conn, kernel_schema).latest_runs(5)
    assert run.status == "completed"


COMMANDS = [
    ["runs", "list"], ["deploy", "{campaign}"], ["campaigns", "check", "{campaign}", "--workspace", "{workspace}"],
    ["run", "--until-idle"], ["ui", "--bind", "127.0.0.1:0"],
]


@pytest.mark.parametrize("version", [OLDER, NEWER_MAJOR], ids=["older", "newer-major"])
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_an_older_or_next_major_kernel_is_refused_before_anything_is_written(cli, conn, db_dsn, kernel_schema,
                                                                              version, command):
    seeded = seed_campaign(conn, kernel_schema, contacts=5, provider="noop")
    pretend_kernel_version(conn, kernel_schema, version)
    args = [a.format(campaign=seeded.campaign_id, workspace=seeded.workspace_id) for a in command]
    result = cli("--dsn", db_dsn, "--schema", kernel_schema, *args)
    assert result.exit_code == ExitCode.DATABASE_ERROR, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: kernel {version} in schema {kernel_schema} is "), line
    to_do = "run kernel-driver migrate first" if version == OLDER else f"install kernel-driver {MAJOR + 1}.x"
    assert line.endswith(to_do), line
    assert runs_of(conn, kernel_schema) == 0


def test_migrate_refuses_a_database_with_migrations_this_driver_lacks(cli, conn, db_dsn, kernel_schema):
    ledger = sql.SQL("{}.schema_migrations").format(sql.Identifier(kernel_schema))
    last = conn.execute(sql.SQL("SELECT max(version) FROM {}").format(ledger)).fetchone()[0]
    newer = f"{last + 1:04d}_kernel_{MAJOR}_{MINOR + 1}"
    conn.execute(sql.SQL("INSERT INTO {} (version, name, sha256) VALUES (%s, %s, %s)").format(ledger),
                 (last + 1, newer, "0" * 64))
    pretend_kernel_version(conn, kernel_schema, NEWER_MINOR)

    refused = cli("--dsn", db_dsn, "--schema", kernel_schema, "migrate")
    assert refused.exit_code == ExitCode.MIGRATION_REFUSED, refused.output
    assert refused.output == (f"error: the database has migration {newer} (version {last + 1}) but there is no such"
                              " file: use a kernel-driver at least as new as the database\n")
    status = cli("--dsn", db_dsn, "--schema", kernel_schema, "migrate", "--status")
    assert status.exit_code == 0, status.output
    assert f"{newer}" in status.output and "no file" in status.output
    assert status.output.splitlines()[-1] == f"kernel_version: {NEWER_MINOR} (schema {kernel_schema})"

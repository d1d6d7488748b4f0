"""kernel-driver migrate: every user mistake ends with one `error:` line and a stable exit code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

Cli = Callable[..., Result]
NOBODY_LISTENS = "postgresql://postgres@127.0.0.1:1/postgres"


def one_error_line(result: Result) -> str:
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_help_lists_migrate(cli: Cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    assert "migrate" in result.stdout and "KERNEL_DSN" in result.stdout


def test_missing_dsn_is_a_usage_error(cli: Cli) -> None:
    result = cli("migrate")
    assert result.exit_code == 2
    assert "pass --dsn postgresql://… or set KERNEL_DSN" in one_error_line(result)


@pytest.mark.parametrize("name", ["Kernel", "1kernel", "kernel-x", "k" * 42, ""])
def test_invalid_schema_name_is_a_usage_error(cli: Cli, name: str) -> None:
    result = cli("--dsn", NOBODY_LISTENS, "--schema", name, "migrate")
    assert result.exit_code == 2
    assert f"invalid schema name {name!r}" in one_error_line(result)


def test_schema_and_dsn_come_from_the_environment(cli: Cli) -> None:
    bad_schema = cli("migrate", env={"KERNEL_DSN": NOBODY_LISTENS, "KERNEL_SCHEMA": "Nope"})
    assert bad_schema.exit_code == 2
    unreachable = cli("migrate", env={"KERNEL_DSN": NOBODY_LISTENS})
    assert unreachable.exit_code == 4


@pytest.mark.parametrize(
    "args",
    [
        ["migrate", "--dsn", NOBODY_LISTENS, "--schema", "Nope"],
        ["migrate", f"--dsn={NOBODY_LISTENS}", "--schema=Nope", "--dry-run"],
        ["--dsn", NOBODY_LISTENS, "migrate", "--schema", "Nope"],
    ],
)
def test_dsn_and_schema_may_follow_the_command(cli: Cli, args: list[str]) -> None:
    # The bad schema name proves --schema was read; the unreachable DSN that --dsn was.
    assert cli(*args).exit_code == 2
    args = [arg.replace("Nope", "kernel") for arg in args]
    assert cli(*args).exit_code == 4


def test_group_options_after_a_double_dash_stay_put() -> None:
    from kernel_driver.cli import hoist_group_options

    assert hoist_group_options(["run", "--dsn", "x", "--", "--schema", "y"]) == [
        "--dsn", "x", "run", "--", "--schema", "y",
    ]


@pytest.mark.parametrize("dsn", [NOBODY_LISTENS, "host=127.0.0.1 port=1 nonsense"])
def test_unreachable_database_exits_4(cli: Cli, dsn: str) -> None:
    result = cli("--dsn", dsn, "migrate")
    assert result.exit_code == 4
    assert "cannot connect to the database" in one_error_line(result)


def write(sql: Path, *names: str) -> Path:
    (sql / "migrations").mkdir(parents=True)
    for name in names:
        (sql / "migrations" / name).write_text("SELECT 1;\n")
    return sql


@pytest.mark.parametrize(
    ("files", "complaint"),
    [
        (["0001_kernel.sql", "0003_later.sql"], "expected 0002, found 0003_later.sql"),
        (["0001_kernel.sql", "0001_again.sql"], "expected 0002, found 0001_kernel.sql"),
        (["0002_first.sql"], "expected 0001, found 0002_first.sql"),
        (["0001_kernel.sql", "2_short.sql"], "2_short.sql: migration files must be named"),
        (["0001_Kernel.sql"], "0001_Kernel.sql: migration files must be named"),
        ([], "no migration files"),
    ],
)
def test_bad_migration_files_are_refused_before_connecting(
    cli: Cli, tmp_path: Path, files: list[str], complaint: str
) -> None:
    sql = write(tmp_path / "sql", *files)
    result = cli("--dsn", NOBODY_LISTENS, "migrate", "--sql-dir", str(sql))
    assert result.exit_code == 3
    assert complaint in one_error_line(result)

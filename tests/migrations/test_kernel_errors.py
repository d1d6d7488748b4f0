"""KE* SQLSTATEs raised by the kernel's SQL (a migration's or a function's) arrive as the matching
KernelError subclass, chosen by SQLSTATE alone."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from kernel_driver import db, migrate

REPO = Path(__file__).resolve().parents[2]
# One owner: the KernelError subclasses in kernel_driver/db.py, each with its sqlstate. The
# contract's table and the SQL's raise sites are checked against it, not copied.
DOCUMENTED_ROW = re.compile(r"^\| (KE\d{3}) \| (.+) \|$", re.M)
RAISED = re.compile(r"ERRCODE\s*=\s*'(KE\d{3})'")


def contract_codes() -> list[str]:
    text = (REPO / "docs" / "EXECUTION_CONTRACT.md").read_text()
    return DOCUMENTED_ROW.findall(text[text.index("## Errors"):])


def test_the_contract_documents_exactly_the_driver_s_sqlstates_in_order() -> None:
    assert [code for code, _ in contract_codes()] == list(db.ERRORS_BY_SQLSTATE)


def test_the_sql_raises_every_listed_sqlstate_and_no_other() -> None:
    raised = set()
    for path in sorted((REPO / "sql" / "migrations").glob("*.sql")):
        raised |= set(RAISED.findall(path.read_text()))
    assert raised == set(db.ERRORS_BY_SQLSTATE)


def test_every_sqlstate_has_its_own_exception_class() -> None:
    classes = list(db.ERRORS_BY_SQLSTATE.values())
    assert len(set(classes)) == len(classes)
    assert all(issubclass(c, db.KernelError) and c.sqlstate == code for code, c in db.ERRORS_BY_SQLSTATE.items())


def raise_in_sql(sqlstate: str, message: str) -> str:
    return f"DO $$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}'; END $$;"


@pytest.mark.parametrize(
    ("sqlstate", "error_class"), [*db.ERRORS_BY_SQLSTATE.items(), ("KE099", db.KernelError)]
)
def test_wrap_errors_maps_sqlstate_to_exception(
    server_dsn: str, sqlstate: str, error_class: type[db.KernelError]
) -> None:
    with db.connect(server_dsn, autocommit=True) as conn, pytest.raises(db.KernelError) as caught, db.wrap_errors():
        conn.execute(raise_in_sql(sqlstate, "lease lost, says the message text"))
    assert type(caught.value) is error_class
    assert caught.value.sqlstate == sqlstate
    assert str(caught.value) == "lease lost, says the message text"
    assert isinstance(caught.value.__cause__, psycopg.Error)


def test_other_database_errors_pass_through(server_dsn: str) -> None:
    with (
        db.connect(server_dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.DivisionByZero),
        db.wrap_errors(),
    ):
        conn.execute("SELECT 1 / 0")


def test_migration_raising_a_ke_code_raises_its_exception(server_dsn: str) -> None:
    refusal = migrate.Migration(1, "0001_guarded", raise_in_sql("KE010", "nothing"), "-")
    with db.connect(server_dsn, autocommit=True) as conn, pytest.raises(db.NothingToRetry):
        migrate.apply(conn, "kt_never_created", refusal)

"""KE* SQLSTATEs raised by the kernel's SQL (a migration's or a function's) arrive as the matching
KernelError subclass, chosen by SQLSTATE alone."""

from __future__ import annotations

import psycopg
import pytest

from kernel_driver import db, migrate

DOCUMENTED = {
    "KE001": db.PrerequisitesFailed,
    "KE002": db.NotFound,
    "KE003": db.RunAlreadyActive,
    "KE004": db.IllegalTransition,
    "KE005": db.LeaseLost,
    "KE006": db.ItemsNotTerminal,
    "KE007": db.ContactsNotReserved,
    "KE008": db.InvalidArgument,
    "KE009": db.TenantScopeRequired,
    "KE010": db.NothingToRetry,
    "KE011": db.RunNotFinished,
    "KE012": db.TerminalItemImmutable,
    "KE013": db.OperatorRequired,
}


def raise_in_sql(sqlstate: str, message: str) -> str:
    return f"DO $$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}'; END $$;"


def test_every_documented_sqlstate_has_its_exception() -> None:
    assert db.ERRORS_BY_SQLSTATE == DOCUMENTED


@pytest.mark.parametrize(
    ("sqlstate", "error_class"), [*DOCUMENTED.items(), ("KE099", db.KernelError)]
)
def test_wrap_errors_maps_sqlstate_to_exception(
    server_dsn: str, sqlstate: str, error_class: type[db.KernelError]
) -> None:
    with db.connect(server_dsn, autocommit=True) as conn:
        with pytest.raises(db.KernelError) as caught, db.wrap_errors():
            conn.execute(raise_in_sql(sqlstate, "lease lost, says the message text"))
    assert type(caught.value) is error_class
    assert caught.value.sqlstate == sqlstate
    assert str(caught.value) == "lease lost, says the message text"
    assert isinstance(caught.value.__cause__, psycopg.Error)


def test_other_database_errors_pass_through(server_dsn: str) -> None:
    with db.connect(server_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), db.wrap_errors():
            conn.execute("SELECT 1 / 0")


def test_migration_raising_a_ke_code_raises_its_exception(server_dsn: str) -> None:
    refusal = migrate.Migration(1, "0001_guarded", raise_in_sql("KE010", "nothing"), "-")
    with db.connect(server_dsn, autocommit=True) as conn, pytest.raises(db.NothingToRetry):
        migrate.apply(conn, "kt_never_created", refusal)

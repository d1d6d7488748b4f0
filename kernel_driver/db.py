"""Connections, scratch databases, and the kernel's SQLSTATEs as Python exceptions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from kernel_driver.config import Settings
from kernel_driver.errors import BadUsage


class DatabaseUnreachable(Exception):
    """The DSN is malformed, or no server accepts it (down, wrong host, auth refused)."""


def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection:
    # No server-side prepared statements: a transaction-mode pooler (PgBouncer, Supavisor)
    # hands each transaction to any server connection, where a prepared name may not exist.
    try:
        return psycopg.connect(dsn, autocommit=autocommit, prepare_threshold=None)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
        # libpq spreads its message over several lines; the CLI prints one.
        reason = re.sub(r"\s+", " ", str(exc)).strip()
        raise DatabaseUnreachable(f"cannot connect to the database: {reason}") from exc


# The server ended the connection: admin_shutdown (a fast stop, a terminated backend),
# crash_shutdown, cannot_connect_now (starting up or shutting down); and class 08.
SERVER_ENDED = {"57P01", "57P02", "57P03"}


def connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) means the connection is gone, not that a
    statement was refused: psycopg raises OperationalError for both. Not for a connection
    that never was (DatabaseUnreachable)."""
    if isinstance(exc, DatabaseUnreachable):
        return False
    for error in (exc, exc.__cause__):
        if isinstance(error, psycopg.OperationalError):
            state = error.sqlstate
            return state is None or state.startswith("08") or state in SERVER_ENDED
    return False


def require_dsn(settings: Settings) -> str:
    if not settings.dsn:
        raise BadUsage("no database given: pass --dsn postgresql://… or set KERNEL_DSN")
    return settings.dsn


@contextmanager
def database(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection for a command; closed when it ends."""
    with connect(require_dsn(settings), autocommit=True) as conn:
        yield conn


def dsn_for_database(dsn: str, dbname: str) -> str:
    """The same server and credentials as ``dsn``, another database."""
    return make_conninfo(dsn, dbname=dbname)


# --- the kernel's refusals (docs/EXECUTION_CONTRACT.md, "Errors") -------------------------


class KernelError(Exception):
    """The kernel refused a call with a SQLSTATE of class KE.

    Subclasses exist for every documented code; a KE code this driver does not know yet
    (a newer kernel) still arrives as a KernelError carrying its sqlstate.
    """

    sqlstate = "KE000"

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate


class PrerequisitesFailed(KernelError):
    sqlstate = "KE001"


class NotFound(KernelError):
    sqlstate = "KE002"


class RunAlreadyActive(KernelError):
    sqlstate = "KE003"


class IllegalTransition(KernelError):
    sqlstate = "KE004"


class LeaseLost(KernelError):
    sqlstate = "KE005"


class ItemsNotTerminal(KernelError):
    sqlstate = "KE006"


class ContactsNotReserved(KernelError):
    sqlstate = "KE007"


class InvalidArgument(KernelError):
    sqlstate = "KE008"


class TenantScopeRequired(KernelError):
    sqlstate = "KE009"


class NothingToRetry(KernelError):
    sqlstate = "KE010"


class RunNotFinished(KernelError):
    sqlstate = "KE011"


class TerminalItemImmutable(KernelError):
    sqlstate = "KE012"


class OperatorRequired(KernelError):
    sqlstate = "KE013"


ERRORS_BY_SQLSTATE: dict[str, type[KernelError]] = {
    cls.sqlstate: cls for cls in KernelError.__subclasses__()
}


@contextmanager
def wrap_errors() -> Iterator[None]:
    """Re-raise a KE* database error as its KernelError subclass (by SQLSTATE, never by text).

    Other database errors pass through unchanged. Usable as a decorator too.
    """
    try:
        yield
    except psycopg.Error as exc:
        sqlstate = exc.diag.sqlstate
        if sqlstate is None or not sqlstate.startswith("KE"):
            raise
        error_class = ERRORS_BY_SQLSTATE.get(sqlstate, KernelError)
        raise error_class(exc.diag.message_primary or str(exc), sqlstate) from exc


# --- scratch databases (tests, `make schema`) -------------------------------------------


def create_database(admin: psycopg.Connection, name: str, template: str = "template0") -> None:
    """CREATE DATABASE on an autocommit connection to the same server."""
    admin.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    )


def drop_database(admin: psycopg.Connection, name: str) -> None:
    # FORCE ends sessions a caller forgot to close, which would otherwise block the DROP.
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_roles(admin: psycopg.Connection, roles: Iterable[str]) -> None:
    """Drop cluster-global roles; run it after dropping every database that used them."""
    names = list(roles)
    if names:
        admin.execute(
            sql.SQL("DROP ROLE IF EXISTS {}").format(sql.SQL(", ").join(map(sql.Identifier, names)))
        )


@contextmanager
def postgres_server(dsn: str | None) -> Iterator[str]:
    """The server at ``dsn`` when given, else an embedded one for the duration."""
    if dsn:
        yield dsn
    else:
        from kernel_driver.testing.postgres import (
            embedded_postgres,  # needs the testing extra
        )

        with embedded_postgres() as embedded_dsn:
            yield embedded_dsn

"""An embedded PostgreSQL (pgserver), for when no server is given: scratch databases, the demo."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from kernel_driver.errors import BadUsage


@contextmanager
def embedded_postgres(pgdata: Path | None = None) -> Iterator[str]:
    """Start a PostgreSQL server (pgserver) and yield its DSN. Without ``pgdata`` it is a
    throwaway one, deleted after; with it, the data stays there and the server is stopped.

    pgserver ships its own binaries and, unlike the system ``initdb``, also works when run as
    root (it runs the server as a separate system user).
    """
    # pgserver's platformdirs warns whenever XDG_RUNTIME_DIR is unset (as in CI); it copes.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    try:
        from pgserver.postgres_server import (
            get_server,  # heavy: only the embedded case needs it
        )
    except ModuleNotFoundError as exc:
        raise BadUsage(
            "an embedded PostgreSQL needs the testing extra: pip install 'kernel-driver[testing]'"
            " (or give a server with --dsn / KERNEL_DSN)"
        ) from exc
    if pgdata is None:
        server = get_server(Path(tempfile.mkdtemp(prefix="kernel-pg-")), cleanup_mode="delete")
    else:
        pgdata.mkdir(parents=True, exist_ok=True)
        server = get_server(pgdata, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _server(dsn: str) -> Any:
    """The embedded server (pgserver's PostgresServer) behind `dsn`."""
    from pgserver.postgres_server import PostgresServer

    (server,) = [s for s in PostgresServer._instances.values() if s.get_uri() == dsn]
    return server


def pg_ctl(dsn: str, *args: str) -> str:
    """pg_ctl ARGS… on the embedded server behind `dsn`, as its own system user."""
    from pgserver import _commands  # its pg_ctl & co. are made at import time

    server = _server(dsn)
    run = getattr(_commands, "pg_ctl")  # noqa: B009 (mypy cannot see it)
    return str(run(list(args), pgdata=server.pgdata, user=server.system_user, timeout=60))


def restart_immediately(dsn: str) -> None:
    """pg_ctl restart -m immediate (a crash: no checkpoint, every connection cut) of the
    embedded server behind `dsn`."""
    pg_ctl(dsn, "-w", "-m", "immediate", "restart")


def start_if_stopped(dsn: str) -> None:
    """Start the embedded server behind `dsn` again if it stopped (as after a PANIC whose crash
    recovery failed), with its own socket directory and log."""
    _server(dsn).ensure_postgres_running()


def connected(dsn: str, timeout: float = 30) -> psycopg.Connection:
    """An autocommit connection with the kernel schema on the path, once the server (maybe
    just restarted) accepts one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True, options="-c search_path=kernel")
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

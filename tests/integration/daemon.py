"""The daemon as a real subprocess against a test database, the logins and DSNs that clients
(daemons, tenants) connect with, and the queries the daemon tests share.

``start_daemon`` is the one place a test starts ``kernel-driver run``: it builds the command line
(``--dsn``, ``--schema``, the short intervals of ``DEFAULT_ARGS``, then the caller's arguments),
the environment (this process's, plus ``env``) and a log file for the daemon's output (it writes
only to stderr; a file, unlike a pipe nobody reads, never fills up and stalls it), and returns a
:class:`Daemon`. Daemons still running when pytest exits are killed, their logs removed.

``login_role`` makes a LOGIN role granted one kernel role (least privilege, as in production);
``client_dsn`` is the one place a DSN is given another user or a tenant scope.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_ARGS = ("--poll-interval", "0.2", "--lease-seconds", "3", "--grace-seconds", "5")
LOG_TAIL = 4000  # characters of a daemon's log that a failure message quotes


def daemon_command(dsn: str, schema: str | None, *args: str) -> list[str]:
    """``kernel-driver --dsn DSN --schema SCHEMA run DEFAULT_ARGS… ARGS…`` (no ``--schema`` for None)."""
    schema_args = [] if schema is None else ["--schema", schema]
    return [sys.executable, "-m", "kernel_driver", "--dsn", dsn, *schema_args, "run", *DEFAULT_ARGS, *args]


@dataclass
class Daemon:
    """A running ``kernel-driver run`` and the file its output goes to."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        """Its exit code once it has ended, else None."""
        return self.process.poll()

    def output(self) -> str:
        """What it has written so far."""
        return self.log.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float | None = 120) -> str:
        """Wait for it to end; its output. Still running after ``timeout`` s: killed, and the test fails."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon still running after {timeout} s:\n{self.output()[-LOG_TAIL:]}") from None
        return self.output()

    def finish(self, timeout: float | None = 120) -> str:
        """``wait``, and fail unless it exited 0; its output."""
        output = self.wait(timeout)
        assert self.returncode == 0, f"daemon exited {self.returncode}:\n{output[-LOG_TAIL:]}"
        return output

    def stop(self, timeout: float | None = 30) -> str:
        """SIGTERM (stop claiming, drain, release, exit), then ``wait``; its output."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, a crash: nothing of the daemon runs after it. Returns once it is reaped."""
        self.send_signal(signal.SIGKILL)
        self.process.wait()


_started: list[Daemon] = []


@functools.cache
def _log_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="kernel-daemons-"))

    def clean_up() -> None:
        for daemon in _started:
            if daemon.poll() is None:
                daemon.kill()
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(clean_up)
    return directory


def start_daemon(dsn: str, schema: str | None, *args: str, env: Mapping[str, str] | None = None) -> Daemon:
    """Start ``kernel-driver run`` (see the module docstring); ``schema`` None: the default one."""
    descriptor, name = tempfile.mkstemp(prefix="daemon-", suffix=".log", dir=_log_directory())
    with os.fdopen(descriptor, "wb") as log:
        process = subprocess.Popen(daemon_command(dsn, schema, *args), env={**os.environ, **(env or {})},
                                   stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(process, Path(name))
    _started.append(daemon)
    return daemon


def run_until_idle(dsn: str, schema: str | None, *args: str, env: Mapping[str, str] | None = None,
                   timeout: float = 120) -> str:
    """A daemon with ``--until-idle``, waited for; fails unless it exited 0. Its output."""
    return start_daemon(dsn, schema, "--until-idle", *args, env=env).finish(timeout)


@contextmanager
def login_role(admin: psycopg.Connection, schema: str, role: str) -> Iterator[str]:
    """A new LOGIN role granted ``<schema>_<role>`` (app, reader, worker, operator) and nothing
    else, for the duration: its name. Dropped after, with what it owns in ``admin``'s database
    (``admin``: an autocommit superuser connection; close the login's own connections first)."""
    user = f"{schema}_l{secrets.token_hex(3)}_{role}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
        sql.Identifier(user), sql.Identifier(f"{schema}_{role}")))
    try:
        yield user
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(user)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


def client_dsn(dsn: str, *, user: str | None = None, tenant: object | None = None) -> str:
    """``dsn`` as ``user`` and/or scoped to ``tenant`` for the whole session: ``-c
    execution_kernel.tenant_id=…`` added to the options ``dsn`` has, as a tenant-scoped client
    connects straight to PostgreSQL (a transaction pooler refuses or drops it: tests/pooler)."""
    params: dict[str, Any] = {}
    if user is not None:
        params["user"] = user
    if tenant is not None:
        options = conninfo_to_dict(dsn).get("options") or ""
        params["options"] = f"{options} -c execution_kernel.tenant_id={tenant}".strip()
    return make_conninfo(dsn, **params)


def item_counts(conn, run_ids: Sequence[object]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM channel_outbox WHERE run_id = ANY(%s) GROUP BY status", (list(run_ids),)
    ).fetchall()
    return dict(rows)


def job_workers(conn, run_id) -> set[str]:
    """The workers that completed jobs of a run (from the audit trail)."""
    rows = conn.execute(
        "SELECT DISTINCT worker FROM job_events WHERE run_id = %s AND entity = 'job' AND to_status = 'completed'",
        (run_id,),
    ).fetchall()
    return {row[0] for row in rows}


def in_flight_ids(conn, run_id) -> set[object]:
    """Items handed to a provider whose outcome is not recorded yet."""
    return {row[0] for row in conn.execute(
        "SELECT id FROM channel_outbox WHERE run_id = %s AND status = 'pending' AND dispatched_at IS NOT NULL",
        (run_id,),
    )}


def run_status(conn, run_id) -> str:
    return conn.execute("SELECT status FROM campaign_runs WHERE id = %s", (run_id,)).fetchone()[0]


def wait_until(predicate, timeout: float = 30, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)

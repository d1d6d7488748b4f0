"""A real PgBouncer in transaction mode in front of a fresh kernel database.

``start_pgbouncer(pool_size=1, **settings)`` starts a ``pgbouncer`` process of its own (Debian's
package; ``.ci/run`` installs it) on a free 127.0.0.1 port, in front of this test's database
(``db_dsn``: a clone of the migrated template), and returns a :class:`PgBouncer`; ``pgbouncer`` is
one with a pool of one server connection per (database, user), so that every client of a user
shares it. Each is stopped after the test; the LOGIN roles made with ``PgBouncer.login`` are
dropped, the database by ``db_dsn``.

PgBouncer pools per (database, user): clients of one LOGIN role share server connections, those of
two roles never do. ``pool_mode = transaction`` hands the server connection to the next client at
every COMMIT or ROLLBACK (in autocommit mode: after every statement) and runs no reset query
in between (``server_reset_query`` is for session mode), which is what a platform's pooler does.

Without pgbouncer the tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kernel_driver import db
from tests.integration.daemon import login_role

POOLED_DATABASE = "kernel"  # the database name clients give the pooler


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skips the test without one (fails it in CI)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    reason = "pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason}: CI must run the pooler tests")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """A connection that works through a transaction pooler: no server-side prepared statements
    (PgBouncer 1.18 does not track them; the next client's server connection lacks them)."""
    return psycopg.connect(dsn, **{"autocommit": True, "prepare_threshold": None, **kwargs})


class PgBouncer:
    """One running pgbouncer. ``pooled_dsn``/``direct_dsn``: the test database as the superuser,
    through the pooler and straight to PostgreSQL; ``login(role)`` for a kernel role's login."""

    def __init__(self, binary: str, direct_dsn: str, schema: str, pool_size: int,
                 settings: dict[str, Any]) -> None:
        self.direct_dsn = direct_dsn
        self.schema = schema
        self.pool_size = pool_size
        self._logins = ExitStack()
        self._admin = db.connect(direct_dsn, autocommit=True)
        self._superuser = self._admin.execute("SELECT current_user").fetchone()[0]
        # A directory of its own that pgbouncer can read after it drops root for nobody.
        self.directory = Path(tempfile.mkdtemp(prefix="kernel-pgbouncer-"))
        self.directory.chmod(0o755)
        self.auth_file = self.directory / "users.txt"
        self._users: list[str] = [self._superuser]
        self._write_auth_file()
        self.log = self.directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._start(binary, settings)
        self.pooled_dsn = self.dsn(self._superuser)

    # --- life cycle -------------------------------------------------------------------------

    def _config(self, port: int, settings: dict[str, Any]) -> str:
        server = conninfo_to_dict(self.direct_dsn)
        target = " ".join(f"{key}={server[key]}" for key in ("host", "port", "dbname") if server.get(key))
        options = {
            "listen_addr": "127.0.0.1",
            "listen_port": port,
            "unix_socket_dir": "",
            "auth_type": "trust",  # trust still needs the user in auth_file (login() adds it)
            "auth_file": self.auth_file,
            "admin_users": self._superuser,
            "pool_mode": "transaction",
            "default_pool_size": self.pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 200,
            "server_reset_query": "DISCARD ALL",  # the default; session mode only
            "ignore_startup_parameters": "extra_float_digits",
            **settings,
        }
        lines = ["[databases]", f"{POOLED_DATABASE} = {target}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in options.items()]
        return "\n".join(lines) + "\n"

    def _start(self, binary: str, settings: dict[str, Any]) -> None:
        for _attempt in range(5):  # another process may take the free port first
            self.port = free_port()
            config = self.directory / "pgbouncer.ini"
            config.write_text(self._config(self.port, settings))
            config.chmod(0o644)
            user = ["-u", self._run_as()] if os.geteuid() == 0 else []
            with self.log.open("ab") as log:
                self._process = subprocess.Popen([binary, *user, str(config)], stdout=log, stderr=log)
            if self._wait_until_listening():
                return
            self.stop()
            if "Address already in use" not in self.log.read_text():
                break
        raise RuntimeError(f"pgbouncer did not start:\n{self.log.read_text()}")

    def _run_as(self) -> str:
        """pgbouncer refuses to run as root. It runs as nobody, or, when it reaches the server
        through a Unix socket in a private directory (the embedded pgserver's), as that
        directory's owner."""
        host = conninfo_to_dict(self.direct_dsn).get("host") or ""
        if host.startswith("/") and os.path.isdir(host):
            owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
            if owner != "root":
                return owner
        return "nobody"

    def _wait_until_listening(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                self.admin("SHOW VERSION")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def close(self) -> None:
        self.stop()
        self._logins.close()
        self._admin.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- use -------------------------------------------------------------------------------

    def dsn(self, user: str, **params: Any) -> str:
        """The test database through the pooler as ``user``."""
        return make_conninfo(host="127.0.0.1", port=self.port, dbname=POOLED_DATABASE, user=user, **params)

    def login(self, role: str) -> str:
        """A new LOGIN role granted ``<schema>_<role>`` (app, reader, worker, operator), known to
        the pooler; returns its name (``dsn(name)`` to connect through the pooler)."""
        user = self._logins.enter_context(login_role(self._admin, self.schema, role))
        self._users.append(user)
        self._write_auth_file()
        self.admin("RELOAD")
        return user

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run a command on the pooler's admin console (SHOW POOLS, RELOAD, …)."""
        with connect(make_conninfo(host="127.0.0.1", port=self.port, dbname="pgbouncer",
                                   user=self._superuser, connect_timeout=2)) as console:
            cursor = console.execute(command)
            return cursor.fetchall() if cursor.description else []

    def _write_auth_file(self) -> None:
        self.auth_file.write_text("".join(f'"{user}" ""\n' for user in self._users))
        self.auth_file.chmod(0o644)


StartPgBouncer = Callable[..., PgBouncer]


@pytest.fixture
def start_pgbouncer(db_dsn: str, kernel_schema: str) -> Iterator[StartPgBouncer]:
    """start_pgbouncer(pool_size=1, **settings): a pgbouncer in front of this test's database;
    ``settings`` override lines of its [pgbouncer] section."""
    binary = pgbouncer_binary()
    started: list[PgBouncer] = []

    def start(pool_size: int = 1, **settings: Any) -> PgBouncer:
        bouncer = PgBouncer(binary, db_dsn, kernel_schema, pool_size, settings)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in reversed(started):
        bouncer.close()


@pytest.fixture
def pgbouncer(start_pgbouncer: StartPgBouncer) -> PgBouncer:
    """pgbouncer in transaction mode, one server connection per (database, user)."""
    return start_pgbouncer(pool_size=1)

"""Shared by the scenarios: fresh databases, the kernel migrated into them, daemons as subprocesses
(peak RSS and CPU from wait4), item checks, table sizes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.cpu import busy_since, machine_busy_s
from kernel_driver.queries import Kernel

SCHEMA = "kernel"
ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A scenario ran but did not do what it must (an item not sent, a duplicate, a crash)."""


def kernel_command() -> list[str]:
    """The `kernel-driver` of the Python running the benchmark (.bench/venv installs the checkout)."""
    script = Path(sys.executable).with_name("kernel-driver")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kernel_driver"]


@contextmanager
def fresh_database(server_dsn: str, label: str) -> Iterator[str]:
    """A new database on the benchmark server, dropped afterwards whatever happened."""
    name = f"kbench_{label}_{secrets.token_hex(3)}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def url_dsn(dsn: str) -> str:
    """The DSN as a postgresql:// URL (the node peers' client reads only that form)."""
    parts = conninfo_to_dict(dsn)
    user = quote(str(parts.get("user", "postgres")), safe="")
    password = f":{quote(str(parts['password']), safe='')}" if parts.get("password") else ""
    host = parts.get("host", "127.0.0.1")
    if str(host).startswith("/"):
        return f"postgresql://{user}{password}@/{parts.get('dbname', '')}?host={quote(str(host))}"
    return f"postgresql://{user}{password}@{host}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def migrate(dsn: str) -> None:
    result = subprocess.run([*kernel_command(), "--dsn", dsn, "migrate"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"kernel-driver migrate exited {result.returncode}: {result.stderr[-2000:]}")


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, options=f"-c search_path={SCHEMA},public")


@contextmanager
def kernel_database(server_dsn: str, label: str) -> Iterator[tuple[str, psycopg.Connection]]:
    """A fresh database with the kernel migrated by `kernel-driver migrate`, and a connection."""
    with fresh_database(server_dsn, label) as dsn:
        migrate(dsn)
        with connect(dsn) as conn:
            yield dsn, conn


def one(conn: psycopg.Connection, query: str | sql.Composed, params: Params | None = None) -> tuple[Any, ...]:
    """The first row of `query`; BenchError when it returns none."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise BenchError(f"no row from {query!r}")
    return row


def scalar(conn: psycopg.Connection, query: str | sql.Composed, params: Params | None = None) -> Any:
    """The first column of the first row of `query`; BenchError when it returns no row."""
    return one(conn, query, params)[0]


def analyze_host_tables(conn: psycopg.Connection) -> None:
    """The application's tables as autovacuum keeps them: analysed. Freshly filled and never
    analysed, they made the launch check join the audience to contacts by a scan of all of them.
    (The kernel's own tables are left as they are: its plans must not depend on their statistics.)"""
    conn.execute("ANALYZE kernel.contacts, kernel.campaigns, kernel.campaign_audience, kernel.provider_configs")


def deploy(conn: psycopg.Connection, campaign_id: Any) -> Any:
    return Kernel(conn, SCHEMA).deploy_campaign(campaign_id)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log: Path
    exit_code: int | None = None
    maxrss_kib: int = 0
    cpu_s: float = 0.0
    ended_at: float | None = None
    _waiter: threading.Thread | None = field(default=None, repr=False)

    def _wait(self) -> None:
        _, status, usage = os.wait4(self.process.pid, 0)
        self.ended_at = time.time()
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.process.returncode = self.exit_code
        self.maxrss_kib = usage.ru_maxrss
        self.cpu_s = usage.ru_utime + usage.ru_stime

    def join(self, timeout: float) -> None:
        assert self._waiter is not None
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            self.process.kill()
            self._waiter.join(10)
            raise BenchError(f"the daemon did not finish within {timeout:.0f} s; its log: {self.log}")

    def stop(self, timeout: float = 30) -> None:
        if self.exit_code is None:
            self.process.send_signal(signal.SIGTERM)
        self.join(timeout)


def start_daemon(dsn: str, worker_id: str, concurrency: int, log_dir: Path, *, until_idle: bool = True,
                 prefix: Sequence[str] = ()) -> Daemon:
    """`kernel-driver --dsn DSN run --worker-id W --concurrency C [--until-idle] --poll-interval 0.05`."""
    command = [*prefix, *kernel_command(), "--dsn", dsn, "run", "--worker-id", worker_id,
               "--concurrency", str(concurrency), "--poll-interval", "0.05"]
    if until_idle:
        command.append("--until-idle")
    log = log_dir / f"{worker_id}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    daemon = Daemon(process, log)
    daemon._waiter = threading.Thread(target=daemon._wait, daemon=True)
    daemon._waiter.start()
    return daemon


def run_daemons(conn: psycopg.Connection, dsn: str, run_ids: Sequence[Any], *, daemons: int, concurrency: int,
                log_dir: Path, label: str, timeout: float = 3600, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Start `daemons` daemons with --until-idle, wait for them; wall time from their start to the
    last run's completed_at (the database's clock, the same host's)."""
    started, busy_before = time.time(), machine_busy_s()
    running = [start_daemon(dsn, f"{label}-{i}", concurrency, log_dir, prefix=prefix) for i in range(daemons)]
    for daemon in running:
        daemon.join(timeout)
    machine_cpu_s = busy_since(busy_before)
    failed = [d for d in running if d.exit_code != 0]
    if failed:
        raise BenchError(f"a daemon exited {failed[0].exit_code}; its log: {failed[0].log}: "
                         f"{failed[0].log.read_text(errors='replace')[-1500:]}")
    row = conn.execute(
        "SELECT extract(epoch FROM max(completed_at))::float8, bool_and(status = 'completed')"
        " FROM kernel.campaign_runs WHERE id = ANY(%s)", (list(run_ids),)
    ).fetchone()
    if not row or not row[1]:
        raise BenchError("the daemons exited but not every run is completed")
    return {
        "wall_s": row[0] - started,
        "daemons_exited_s": max(d.ended_at or started for d in running) - started,
        "peak_rss_mib": max(d.maxrss_kib for d in running) / 1024,
        "daemon_cpu_s": sum(d.cpu_s for d in running),
        # from the daemons' start to their exit (wall_s ends at completed_at, a moment before)
        "machine_cpu_s": machine_cpu_s,
    }


def verify_items(conn: psycopg.Connection, run_ids: Sequence[Any], expected: int) -> dict[str, int]:
    """Every one of `expected` items `sent`, no contact twice in a run; the counts by status."""
    counts: dict[str, int] = dict(conn.execute(
        "SELECT status, count(*) FROM kernel.channel_outbox WHERE run_id = ANY(%s) GROUP BY status",
        (list(run_ids),)).fetchall())
    duplicates = scalar(
        conn,
        "SELECT count(*) - count(DISTINCT (run_id, contact_id)) FROM kernel.channel_outbox WHERE run_id = ANY(%s)",
        (list(run_ids),))
    if counts != {"sent": expected} or duplicates:
        raise BenchError(f"expected {expected} items sent and no duplicate; found {counts}, {duplicates} duplicates")
    return {"sent": counts["sent"], "duplicates": duplicates}


def table_sizes(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Per kernel table: heap and index bytes, live and dead tuples, updates and HOT updates."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        """SELECT c.relname, pg_table_size(c.oid), pg_indexes_size(c.oid), s.n_live_tup, s.n_dead_tup,
                  s.n_tup_upd, s.n_tup_hot_upd
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
           WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY pg_total_relation_size(c.oid) DESC""",
        (SCHEMA,)).fetchall()
    keys = ("table_bytes", "index_bytes", "live_tuples", "dead_tuples", "updates", "hot_updates")
    return {row[0]: dict(zip(keys, (int(v or 0) for v in row[1:]), strict=True)) for row in rows}


def run_json_command(command: Sequence[str], timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    """Run a peer script that prints one JSON line last."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        raise BenchError(f"{command[0]} exited {result.returncode}: {result.stderr[-2000:]}")
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def server_version(server_dsn: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        return str(scalar(conn, "SHOW server_version"))

"""Run the daemon as a real subprocess against a test database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

DEFAULT_ARGS = ("--poll-interval", "0.2", "--lease-seconds", "3", "--grace-seconds", "5")


def daemon_command(dsn: str, schema: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kernel_driver", "--dsn", dsn, "--schema", schema, "run", *DEFAULT_ARGS, *args]


def start_daemon(dsn: str, schema: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        daemon_command(dsn, schema, *args),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_until_idle(dsn: str, schema: str, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        daemon_command(dsn, schema, "--until-idle", *args),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"daemon exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


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
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)

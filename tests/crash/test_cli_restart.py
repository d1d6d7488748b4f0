"""The CLI when the database restarts under a command (issue 12, item 3): the command ends with
one line saying the connection was lost and what to do, exit 4, never a traceback; what it was
writing is rolled back whole, and running it again works. The server is a cluster of the test's
own, crashed with pg_ctl restart -m immediate."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from kernel_driver.errors import ExitCode
from kernel_driver.queries import Kernel
from kernel_driver.testing.postgres import connected, restart_immediately
from kernel_driver.testing.seed import seed_campaign

LOST = "error: lost the connection to the database while the command ran ("


def kernel_driver(dsn: str, *args: str, output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "kernel_driver", "--dsn", dsn, *args],
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM kernel.{table}").fetchone()[0]


def test_a_deploy_cut_by_a_crash_leaves_nothing_and_runs_again(own_cluster, tmp_path):
    dsn = own_cluster
    with connected(dsn) as conn:
        campaign = seed_campaign(conn, "kernel", contacts=20, provider="noop").campaign_id
    # Hold the deploy after it has written its run, while it waits to write the jobs.
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE kernel.job_queue IN ACCESS EXCLUSIVE MODE")
    deploy = kernel_driver(dsn, "deploy", str(campaign), output=tmp_path / "deploy.out")
    with connected(dsn) as watcher:
        def run_written_jobs_waiting() -> bool:
            return watcher.execute("""
                SELECT bool_or(c.relname = 'campaign_runs' AND l.granted AND l.mode = 'RowExclusiveLock')
                   AND bool_or(c.relname = 'job_queue' AND NOT l.granted)
                FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE a.query LIKE '%%deploy_campaign%%' AND a.pid <> pg_backend_pid()
            """).fetchone()[0] is True
        wait_for(run_written_jobs_waiting, "the deploy writing its run, then waiting for the job table")
    restart_immediately(dsn)
    assert deploy.wait(60) == ExitCode.DATABASE_UNREACHABLE
    (line,) = (tmp_path / "deploy.out").read_text().strip().splitlines()
    assert line.startswith(LOST) and line.endswith("see with kernel-driver runs list whether its run was made)"), line
    blocker.close()

    with connected(dsn) as conn:
        assert (count(conn, "campaign_runs"), count(conn, "job_queue")) == (0, 0)  # nothing half-written
        again = kernel_driver(dsn, "deploy", str(campaign), output=tmp_path / "again.out")
        assert again.wait(60) == 0, (tmp_path / "again.out").read_text()
        assert count(conn, "campaign_runs") == 1 and count(conn, "job_queue") == 1


def test_watching_a_run_through_a_crash_ends_with_one_line(own_cluster, tmp_path):
    dsn = own_cluster
    with connected(dsn) as conn:
        seeded = seed_campaign(conn, "kernel", contacts=5, provider="noop")
        run_id = Kernel(conn, "kernel").deploy_campaign(seeded.campaign_id)  # no daemon: it stays queued
    output = tmp_path / "watch.out"
    watch = kernel_driver(dsn, "runs", "show", str(run_id), "--watch", "--interval", "0.2", output=output)
    wait_for(lambda: str(run_id) in output.read_text(), "the first view of the run")
    restart_immediately(dsn)
    assert watch.wait(60) == ExitCode.DATABASE_UNREACHABLE
    text = output.read_text()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith(LOST), text[-2000:]

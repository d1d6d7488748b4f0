"""Daemons through a real PgBouncer in transaction mode (issue 8, part 8).

1.0's daemon died there: psycopg prepared its repeated statements on a server connection the
next transaction did not get, and the lease length was a session SET. 1.1 prepares nothing and
keeps no session state; LISTEN needs a direct connection (--listen-dsn), else it polls.
"""

from __future__ import annotations

import time

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.integration.daemon import item_counts, run_status, start_daemon, wait_until
from tests.pooler.conftest import StartPgBouncer


def test_two_daemons_through_the_pooler_finish_a_campaign_once(conn, kernel_schema, start_pgbouncer: StartPgBouncer):
    bouncer = start_pgbouncer(pool_size=2)
    pooled = bouncer.dsn(bouncer.login("worker"))
    seeded = seed_campaign(conn, kernel_schema, contacts=6000, provider="noop")
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 250)
    # More statements than the pool has server connections, from two clients: any session
    # state or prepared statement would land on the other daemon's connection.
    daemons = [
        start_daemon(pooled, kernel_schema, "--until-idle", "--no-listen", "--concurrency", "16",
                     "--worker-id", f"pooled-{n}")
        for n in range(2)
    ]
    outputs = [daemon.wait(timeout=180) for daemon in daemons]
    for daemon, output in zip(daemons, outputs, strict=True):
        assert daemon.returncode == 0, output
        assert "error" not in output.lower(), output
    assert item_counts(conn, [run_id]) == {"sent": 6000}
    assert run_status(conn, run_id) == "completed"
    workers = {row[0] for row in conn.execute(
        "SELECT DISTINCT worker FROM job_events WHERE run_id = %s AND to_status = 'completed' AND entity = 'job'",
        (run_id,))}
    assert workers == {"pooled-0", "pooled-1"}
    # Each key went out once: the outbox has one row per contact.
    assert conn.execute("SELECT count(DISTINCT idempotency_key) FROM channel_outbox WHERE run_id = %s",
                        (run_id,)).fetchone()[0] == 6000


def test_pooled_daemon_wakes_from_a_direct_listen_connection(conn, db_dsn, kernel_schema,
                                                             start_pgbouncer: StartPgBouncer):
    bouncer = start_pgbouncer(pool_size=1)
    pooled = bouncer.dsn(bouncer.login("worker"))
    # A long poll interval: a pick-up well under it can only come from the NOTIFY.
    daemon = start_daemon(pooled, kernel_schema, "--listen-dsn", db_dsn, "--poll-interval", "30")
    try:
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%%'"
        ).fetchone()[0] == 1)
        time.sleep(0.5)  # the daemon's first look for work is over: it now waits
        delays = []
        for _ in range(5):
            seeded = seed_campaign(conn, kernel_schema, contacts=1, provider="noop")
            started = time.monotonic()
            run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
            wait_until(lambda: run_status(conn, run_id) == "completed", timeout=20)  # noqa: B023 - waited on here
            delays.append(time.monotonic() - started)
        assert max(delays) < 10, delays  # not the 30 s poll
    finally:
        output = daemon.stop(timeout=30)
    assert daemon.returncode == 0, output

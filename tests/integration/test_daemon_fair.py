"""Fair claims end to end: a daemon busy with one tenant's backlog serves another tenant's
one-contact campaign within a batch or two, not after the backlog (kernel 1.3.0, issue 10)."""

from __future__ import annotations

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.integration.daemon import item_counts, start_daemon, wait_until


def test_another_tenants_small_campaign_does_not_wait_for_a_backlog(conn, db_dsn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    # Tenant A: 40 batch jobs of 500 contacts, each call 10 ms: about 4 s of work at 100 slots.
    backlog = seed_campaign(conn, kernel_schema, contacts=20_000, provider="noop", settings={"latency_ms": 10})
    small = [seed_campaign(conn, kernel_schema, contacts=1, provider="noop") for _ in range(3)]
    a_run = kernel.deploy_campaign(backlog.campaign_id, 500)
    daemon = start_daemon(db_dsn, kernel_schema, "--until-idle", "--concurrency", "100", "--poll-interval", "0.2")
    wait_until(lambda: conn.execute("SELECT count(*) FROM channel_outbox WHERE run_id = %s AND status = 'sent'",
                                    (a_run,)).fetchone()[0] >= 2000)
    small_runs = [kernel.deploy_campaign(seeded.campaign_id) for seeded in small]
    daemon.finish(timeout=120)

    assert item_counts(conn, [a_run]) == {"sent": 20_000}
    waits = [conn.execute("SELECT extract(epoch FROM completed_at - created_at) FROM campaign_runs WHERE id = %s",
                          (run,)).fetchone()[0] for run in small_runs]
    left = [conn.execute("SELECT count(*) FROM channel_outbox WHERE run_id = %s AND sent_at > ("
                         "SELECT completed_at FROM campaign_runs WHERE id = %s)", (a_run, run)).fetchone()[0]
            for run in small_runs]
    # Each small campaign was served while most of A's backlog was still to be sent (before
    # 1.3 they waited behind every batch queued or held before them: thousands left, seconds).
    assert all(n > 10_000 for n in left), (waits, left)
    assert max(waits) < 1.0, waits

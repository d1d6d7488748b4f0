"""A database blip costs no certainty (issue 12, item 2): the PostgreSQL server is restarted in
immediate mode (a crash: no checkpoint, every connection cut) three times under a running daemon
that sends 1,500 e-mails to a real SMTP server. The daemon is never restarted. Every call was
answered, so none may end `unknown`: the daemon keeps the outcomes it has seen and records them
once it is connected again, while it still holds the lease. And no contact gets a message twice.

The server is a cluster of the test's own (an embedded PostgreSQL), since it is crashed."""

from __future__ import annotations

import time

from kernel_driver.queries import Kernel
from kernel_driver.testing.postgres import connected, restart_immediately
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink
from tests.integration.daemon import item_counts, start_daemon

RESTARTS = 3


def test_immediate_restarts_under_a_running_daemon_lose_no_outcome(own_cluster):
    dsn = own_cluster
    with SmtpSink() as sink:  # the SMTP server stays up all along
        with connected(dsn) as conn:
            seeded = seed_campaign(conn, "kernel", contacts=1500, provider="smtp",
                                   settings=sink.provider_settings())
            run_id = Kernel(conn, "kernel").deploy_campaign(seeded.campaign_id, 250)
        daemon = start_daemon(dsn, "kernel", "--concurrency", "8", "--lease-seconds", "30", "--until-idle")
        sent_at_restarts = []
        for _ in range(RESTARTS):
            time.sleep(1.0)
            with connected(dsn) as conn:
                sent_at_restarts.append(item_counts(conn, [run_id]).get("sent", 0))
            assert sent_at_restarts[-1] < seeded.reachable, "the run ended before the restarts: make it longer"
            restart_immediately(dsn)
        output = daemon.finish(180)
        received = sink.count_by_recipient()
    with connected(dsn) as conn:
        counts = item_counts(conn, [run_id])
        status = conn.execute("SELECT status FROM kernel.campaign_runs WHERE id = %s", (run_id,)).fetchone()[0]
    assert sent_at_restarts == sorted(sent_at_restarts)
    assert output.count("database connection lost, reconnecting") >= RESTARTS, output[-3000:]
    assert set(received.values()) == {1}  # nobody twice
    # Every answered call recorded, and what a lost step had marked dispatched sent after all:
    # none unknown.
    assert counts == {"sent": seeded.reachable}, (counts, output[-5000:])
    assert status == "completed"

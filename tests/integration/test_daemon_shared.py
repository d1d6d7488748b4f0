"""Several daemons on one campaign, the shared rate limit, metrics."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink, WebhookSink
from tests.integration.daemon import item_counts, job_workers, run_status, start_daemon, wait_until


@pytest.mark.parametrize("daemons", [2, 4])
def test_daemons_share_a_campaign_without_duplicates(conn, db_dsn, kernel_schema, daemons):
    with SmtpSink() as sink:
        seeded = seed_campaign(conn, kernel_schema, contacts=2000, provider="smtp",
                               settings=sink.provider_settings(), no_address_every=50)
        run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 100)
        processes = [
            start_daemon(db_dsn, kernel_schema, "--until-idle", "--worker-id", f"d{n}") for n in range(daemons)
        ]
        for process in processes:
            process.finish(timeout=120)
        received = sink.count_by_recipient()
    assert len(received) == seeded.reachable and set(received.values()) == {1}
    assert item_counts(conn, [run_id]) == {"sent": seeded.reachable, "skipped": 2000 - seeded.reachable}
    assert run_status(conn, run_id) == "completed"
    assert len(job_workers(conn, run_id)) >= 2, "the work was not shared"


def test_rate_limit_holds_across_daemons(conn, db_dsn, kernel_schema):
    rate = 20
    with WebhookSink() as sink:
        arrivals: list[float] = []
        handle = sink.handle

        def timed(request):
            arrivals.append(time.monotonic())
            return handle(request)

        sink.handle = timed
        seeded = seed_campaign(conn, kernel_schema, contacts=80, provider="webhook",
                               settings=sink.provider_settings(), max_per_second=rate)
        Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 20)
        processes = [start_daemon(db_dsn, kernel_schema, "--until-idle") for _ in range(2)]
        for process in processes:
            process.finish(timeout=120)
    assert len(sink.deliveries_by_key) == 80
    arrivals.sort()
    # Token bucket: at most one second's burst plus the refill are granted in any one-second
    # window. Arrivals lag their grants by the call's latency, so one chunk (--concurrency, 8)
    # granted just before a window may land inside it.
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1) for start in arrivals)
    assert busiest <= 2 * rate + 8
    assert arrivals[-1] - arrivals[0] >= (80 - 2 * rate) / rate


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_endpoint(conn, db_dsn, kernel_schema):
    port = free_port()
    seeded = seed_campaign(conn, kernel_schema, contacts=30, provider="noop")
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
    daemon = start_daemon(db_dsn, kernel_schema, "--metrics-port", str(port))
    try:
        wait_until(lambda: run_status(conn, run_id) == "completed")
        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        wait_until(lambda: 'kernel_queue_jobs{status="queued"} 0.0' in scrape())
        text = scrape()
    finally:
        daemon.stop(timeout=30)
    assert 'kernel_items_total{channel="email",outcome="sent",provider="noop"} 30.0' in text
    assert "kernel_jobs_claimed_total 1.0" in text
    assert "kernel_provider_call_seconds_count" in text
    assert "kernel_lease_losses_total 0.0" in text
    assert "kernel_queue_oldest_job_age_seconds" in text

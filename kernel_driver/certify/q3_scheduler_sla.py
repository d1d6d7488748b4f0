"""Q3 scheduler SLA: jobs deployed while a daemon runs are picked up and done within the SLA,
on a quiet kernel and while another tenant's large backlog is being sent (kernel 1.4, issue 10)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kernel_driver.certify.harness import SLA_SECONDS, Certification
from kernel_driver.certify.records import CheckRecord, expect, spread
from kernel_driver.testing.sinks import WebhookSink

Q3_CAMPAIGNS = 6
Q3_CONTACTS = 4
Q3_BATCH = 2  # so Q3 queues Q3_CAMPAIGNS * Q3_CONTACTS / Q3_BATCH jobs
Q3_SPREAD_S = 3.0  # deploys are spread over this long
# Under load: the load tenant's backlog (noop calls of 10 ms, 100 at once: a few seconds of
# sending), and one-contact campaigns of the certification tenant deployed once it is under way.
LOAD_CONTACTS = 20_000
LOAD_BATCH = 500
LOAD_STARTED = 1_000  # backlog items sent before the small campaigns are deployed
LOAD_SMALL_CAMPAIGNS = 3


def job_latencies(cert: Certification, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Per job: seconds from creation to its first claim (audit trail) and to its end."""
    return cert.rows(
        "SELECT j.id::text, j.status,"
        " extract(EPOCH FROM c.first_claim - j.created_at)::float8 AS pickup_s,"
        " extract(EPOCH FROM j.completed_at - j.created_at)::float8 AS completion_s"
        " FROM {schema}.job_queue AS j"
        " CROSS JOIN LATERAL (SELECT min(e.occurred_at) AS first_claim FROM {schema}.job_events AS e"
        "   WHERE e.job_id = j.id AND e.to_status = 'processing') AS c"
        " WHERE j.run_id = ANY(%s::uuid[]) ORDER BY j.created_at, j.id",
        list(run_ids),
    )


def check_scheduler_sla(cert: Certification, record: CheckRecord) -> None:
    """Jobs queued over a few seconds while a daemon runs: each picked up and done within the SLA."""
    run_ids: list[str] = []
    with WebhookSink() as sink:
        daemon = cert.start_daemon(record, "q3", "--concurrency", "4")
        cert.wait_listening([daemon])
        for _ in range(Q3_CAMPAIGNS):
            campaign = cert.campaign(record, "email", "webhook", sink.provider_settings(), Q3_CONTACTS)
            run_ids.append(cert.deploy(record, campaign, batch_size=Q3_BATCH))
            time.sleep(Q3_SPREAD_S / Q3_CAMPAIGNS)
        statuses = cert.wait_for_runs(run_ids, timeout=SLA_SECONDS)
        daemon.stop()

    jobs = job_latencies(cert, run_ids)
    unfinished = [job["id"] for job in jobs if job["status"] != "completed"]
    pickup = [job["pickup_s"] for job in jobs if job["pickup_s"] is not None]
    completion = [job["completion_s"] for job in jobs if job["completion_s"] is not None]
    record.measurements = {
        "sla_s": SLA_SECONDS,
        "campaigns": len(run_ids),
        "jobs": len(jobs),
        "deploys_spread_over_s": Q3_SPREAD_S,
        "run_statuses": dict(Counter(statuses.values())),
        "pickup_s": spread(pickup) if pickup else None,
        "completion_s": spread(completion) if completion else None,
    }
    record.measurements["under_load"] = under_load = sla_under_load(cert, record)
    expect(not unfinished, f"jobs did not complete: {', '.join(unfinished)}")
    expect(len(pickup) == len(completion) == len(jobs), "some jobs were never claimed or never ended")
    expect(max(pickup) < SLA_SECONDS, f"slowest pick-up took {max(pickup):.1f} s (SLA {SLA_SECONDS:g} s)")
    expect(max(completion) < SLA_SECONDS, f"slowest job took {max(completion):.1f} s (SLA {SLA_SECONDS:g} s)")
    expect(under_load["unfinished"] == 0, f"{under_load['unfinished']} small campaigns under load did not complete")
    expect(under_load["backlog_left_when_small_done"] > 0,
           "the backlog was sent before the small campaigns completed: Q3 measured no load")
    slowest = under_load["small_completion_s"]["max"]
    expect(slowest < SLA_SECONDS,
           f"under load, the slowest small campaign took {slowest:.1f} s (SLA {SLA_SECONDS:g} s)")


def sla_under_load(cert: Certification, record: CheckRecord) -> dict[str, Any]:
    """One-contact campaigns of the certification tenant deployed while one daemon sends the
    load tenant's backlog: how soon they are picked up and done, and how much of the backlog
    was still to send then (claims take tenants in turns: they must not wait for it)."""
    with cert.acting_for(cert.load_tenant_id):
        backlog = cert.campaign(record, "email", "noop", {"latency_ms": 10}, LOAD_CONTACTS,
                                tenant_id=cert.load_tenant_id)
        backlog_run = str(cert.kernel.deploy_campaign(backlog.campaign_id, LOAD_BATCH))
    small = [cert.campaign(record, "email", "noop", {}, 1) for _ in range(LOAD_SMALL_CAMPAIGNS)]
    daemon = cert.start_daemon(record, "q3-load", "--concurrency", "100", with_load_tenant=True)

    def backlog_sent() -> int:
        with cert.acting_for(cert.load_tenant_id):
            return int(cert.value("SELECT count(*) FROM {schema}.channel_outbox WHERE run_id = %s"
                                  " AND status = 'sent'", backlog_run))

    cert.wait_until("the backlog to be under way", lambda: backlog_sent() >= LOAD_STARTED)
    run_ids = [cert.deploy(record, campaign, batch_size=1) for campaign in small]
    statuses = cert.wait_for_runs(run_ids, timeout=SLA_SECONDS)
    left = LOAD_CONTACTS - backlog_sent()
    with cert.acting_for(cert.load_tenant_id):
        cert.kernel.cancel_campaign_run(backlog_run)  # what is left of it is not the point
    daemon.stop()
    jobs = job_latencies(cert, run_ids)
    return {
        "backlog_tenant_id": str(cert.load_tenant_id),
        "backlog_run_id": backlog_run,
        "backlog_contacts": LOAD_CONTACTS,
        "backlog_sent_before_deploys": LOAD_STARTED,
        "backlog_left_when_small_done": left,
        "small_campaigns": len(run_ids),
        "run_statuses": dict(Counter(statuses.values())),
        "unfinished": sum(1 for status in statuses.values() if status != "completed"),
        "small_pickup_s": spread([job["pickup_s"] or SLA_SECONDS for job in jobs]),
        "small_completion_s": spread([job["completion_s"] or SLA_SECONDS for job in jobs]),
    }

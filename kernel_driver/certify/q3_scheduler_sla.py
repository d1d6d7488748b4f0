"""Q3 scheduler SLA: jobs deployed while a daemon runs are picked up and done within the SLA."""

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
    expect(not unfinished, f"jobs did not complete: {', '.join(unfinished)}")
    expect(len(pickup) == len(completion) == len(jobs), "some jobs were never claimed or never ended")
    expect(max(pickup) < SLA_SECONDS, f"slowest pick-up took {max(pickup):.1f} s (SLA {SLA_SECONDS:g} s)")
    expect(max(completion) < SLA_SECONDS, f"slowest job took {max(completion):.1f} s (SLA {SLA_SECONDS:g} s)")

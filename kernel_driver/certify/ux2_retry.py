"""UX2: a retry creates a run linked to the first, for its failed contacts only."""

from __future__ import annotations

from kernel_driver.certify.harness import Certification
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.db import NothingToRetry
from kernel_driver.testing.sinks import SmtpSink

UX2_CONTACTS = 5
UX2_REJECTED = (2, 4)  # contact numbers whose mailbox the server refuses in the first run


def check_retry(cert: Certification, record: CheckRecord) -> None:
    """A run with refused recipients; its retry targets only them and completes."""
    with SmtpSink() as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), UX2_CONTACTS)
        rejected = {campaign.address(n, "email") for n in UX2_REJECTED}
        sink.reject_rcpt = rejected
        first = cert.deploy(record, campaign, batch_size=UX2_CONTACTS)
        cert.run_daemon_until_idle(record, "ux2-1")
        first_status = cert.wait_for_runs([first])[first]

        sink.reject_rcpt = False  # the provider problem is fixed
        retry = cert.retry(record, first)
        lineage = cert.rows(
            "SELECT retry_of_run_id::text, root_run_id::text, generation FROM {schema}.campaign_runs WHERE id = %s",
            retry,
        )[0]
        targeted = {row["email"] for row in cert.rows(
            "SELECT c.email FROM {schema}.job_queue AS j CROSS JOIN LATERAL unnest(j.contact_ids) AS t (contact_id)"
            " INNER JOIN {schema}.contacts AS c ON c.id = t.contact_id WHERE j.run_id = %s",
            retry,
        )}
        cert.run_daemon_until_idle(record, "ux2-2")
        retry_status = cert.wait_for_runs([retry])[retry]
        received = sink.count_by_recipient()
    try:
        cert.retry(record, retry)
        refused_again = False
    except NothingToRetry:
        refused_again = True

    record.measurements = {
        "first_run": {"id": first, "status": first_status},
        "retry_run": {"id": retry, "status": retry_status, **lineage},
        "targeted": sorted(targeted),
        "deliveries_per_recipient": dict(received),
        "second_retry_refused": refused_again,
    }
    expect(first_status == "partial", f"first run {first} ended {first_status}, expected partial")
    expect(
        lineage["retry_of_run_id"] == first and lineage["root_run_id"] == first and lineage["generation"] == 2,
        f"retry run {retry} is not linked to run {first}: {lineage}",
    )
    expect(targeted == rejected, f"the retry targets {sorted(targeted)}, expected only {sorted(rejected)}")
    expect(retry_status == "completed", f"retry run {retry} ended {retry_status}, expected completed")
    expect(
        len(received) == UX2_CONTACTS and set(received.values()) == {1},
        f"expected each of the {UX2_CONTACTS} recipients to get one message in all: {dict(received)}",
    )
    expect(refused_again, "retrying the completed retry run was not refused with KE010")

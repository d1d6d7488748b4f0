"""Q1 idempotency: two daemons race for one campaign's jobs; no key is inserted or sent twice."""

from __future__ import annotations

from psycopg import sql

from kernel_driver.certify.harness import Certification, keys_received
from kernel_driver.certify.records import CheckRecord, expect
from kernel_driver.testing.sinks import SmtpSink

Q1_CONTACTS = 20


def outbox_summary(cert: Certification, run_id: str) -> dict[str, int]:
    return cert.rows(
        "SELECT count(*) AS items, count(DISTINCT idempotency_key) AS keys,"
        " count(DISTINCT contact_id) AS contacts, count(*) FILTER (WHERE status = 'sent') AS sent,"
        " (SELECT count(*) FROM {schema}.job_events WHERE run_id = %s) AS events"
        " FROM {schema}.channel_outbox WHERE run_id = %s",
        run_id, run_id,
    )[0]


def reinsert_outbox_rows(cert: Certification, run_id: str) -> int:
    """Insert every item of the run again, as a repeated reservation would, then roll back:
    `ON CONFLICT (idempotency_key, tenant_id) DO NOTHING` must insert none of them."""
    with cert.conn.transaction(force_rollback=True):
        return cert.conn.execute(
            sql.SQL(
                "INSERT INTO {schema}.channel_outbox (run_id, job_id, tenant_id, workspace_id, channel,"
                " provider, idempotency_key, contact_id, recipient, root_run_id, generation)"
                " SELECT run_id, job_id, tenant_id, workspace_id, channel, provider, idempotency_key,"
                " contact_id, recipient, root_run_id, generation FROM {schema}.channel_outbox"
                " WHERE run_id = %s ON CONFLICT (idempotency_key, tenant_id) DO NOTHING"
            ).format(schema=sql.Identifier(cert.schema)),
            [run_id],
        ).rowcount


def check_idempotency(cert: Certification, record: CheckRecord) -> None:
    """Two daemons race for one campaign's jobs; a third runs after it finished."""
    # Each racer sends one message at a time, and the sink answers none until two have arrived:
    # both daemons must have claimed a job, however fast one of them is to wake up.
    with SmtpSink(rendezvous=2) as sink:
        campaign = cert.campaign(record, "email", "smtp", sink.provider_settings(), Q1_CONTACTS)
        racers = [cert.start_daemon(record, f"q1-{n}", "--concurrency", "1") for n in (1, 2)]
        cert.wait_listening(racers)
        run_id = cert.deploy(record, campaign, batch_size=1)  # one job per contact, for both to take
        status = cert.wait_for_runs([run_id])[run_id]
        for daemon in racers:
            daemon.stop()
        claims = cert.claims_by_worker([run_id])
        before, received_before = outbox_summary(cert, run_id), keys_received(sink)

        cert.run_daemon_until_idle(record, "q1-again")
        after, received = outbox_summary(cert, run_id), keys_received(sink)
        reinserted = reinsert_outbox_rows(cert, run_id)

    record.measurements = {
        "contacts": Q1_CONTACTS,
        "run_status": status,
        "claims_by_worker": claims,
        "outbox": after,
        "max_outbox_rows_per_key": after["items"] - after["keys"] + 1,
        "max_provider_calls_per_key": max(received.values(), default=0),
        "rows_inserted_by_repeated_reservation": reinserted,
    }
    expect(status == "completed", f"run {run_id} ended {status}, not completed")
    expect(len(claims) == 2, f"jobs were claimed by {claims}: the two daemons did not both work on the campaign")
    expect(
        after["items"] == after["keys"] == after["contacts"] == after["sent"] == Q1_CONTACTS,
        f"expected {Q1_CONTACTS} sent items, one per key and contact; found {after}",
    )
    expect(
        len(received) == Q1_CONTACTS and set(received.values()) == {1},
        f"the SMTP server did not receive each of the {Q1_CONTACTS} keys exactly once: {dict(received)}",
    )
    expect(
        (after, received) == (before, received_before),
        f"a daemon run after the run ended changed it: outbox {before} -> {after}",
    )
    expect(reinserted == 0, f"re-inserting the run's items added {reinserted} rows")

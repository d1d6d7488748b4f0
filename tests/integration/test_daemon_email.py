"""The daemon end to end: a real SMTP server, a real subprocess, a real Postgres."""

from __future__ import annotations

import json

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink
from tests.integration.daemon import item_counts, run_until_idle


def test_email_campaign_reaches_each_reachable_contact_once(conn, db_dsn, kernel_schema):
    with SmtpSink() as sink:
        seeded = seed_campaign(
            conn, kernel_schema, contacts=2000, provider="smtp", settings=sink.provider_settings(),
            unsubscribed_every=10, no_address_every=25,
        )
        run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 500)
        output = run_until_idle(db_dsn, kernel_schema, "--concurrency", "8", "--log-format", "json",
                                "--log-level", "DEBUG")

        received = sink.count_by_recipient()
    assert len(received) == seeded.reachable
    assert set(received.values()) == {1}
    counts = item_counts(conn, [run_id])
    assert counts == {"sent": seeded.reachable, "skipped": 2000 - seeded.reachable}
    assert conn.execute(
        "SELECT count(*) FROM channel_outbox WHERE run_id = %s AND status = 'sent'"
        " AND provider_message_id IS NOT NULL", (run_id,)
    ).fetchone()[0] == seeded.reachable
    message_ids = {m.message_id for m in sink.messages}
    stored = {row[0] for row in conn.execute(
        "SELECT provider_message_id FROM channel_outbox WHERE run_id = %s AND status = 'sent'", (run_id,))}
    assert message_ids == stored
    assert conn.execute("SELECT status FROM campaign_runs WHERE id = %s", (run_id,)).fetchone()[0] == "completed"

    # Logs: one JSON line per job state change at DEBUG, one per run at INFO, never one per item.
    lines = [json.loads(line) for line in output.splitlines()]
    claimed = [line for line in lines if line["message"].startswith("job claimed")]
    assert sorted(line["job_id"] for line in claimed) == sorted(
        str(row[0]) for row in conn.execute("SELECT id FROM job_queue WHERE run_id = %s", (run_id,)))
    ended = [line for line in lines if line["message"].startswith("job completed")]
    assert {line["level"] for line in claimed + ended} == {"DEBUG"} and len(ended) == len(claimed)
    runs = [line for line in lines if "run_status" in line]
    assert [(line["level"], line["run_status"]) for line in runs] == [("INFO", "completed")]
    assert len(lines) < 3 * len(claimed) + 10

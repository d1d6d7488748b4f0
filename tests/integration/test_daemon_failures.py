"""Each provider failure mode ends in the right outbox status (real sinks, real daemon)."""

from __future__ import annotations

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink, VoiceSink, WebhookSink, refused_port
from tests.integration.daemon import item_counts, run_until_idle, start_daemon, wait_until


def deploy(conn, schema, **kwargs):
    seeded = seed_campaign(conn, schema, **kwargs)
    return Kernel(conn, schema).deploy_campaign(seeded.campaign_id)


def errors(conn, run_id) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT error FROM channel_outbox WHERE run_id = %s AND error IS NOT NULL", (run_id,))]


def test_provider_failure_modes(conn, db_dsn, kernel_schema):
    with SmtpSink() as hanging, SmtpSink() as rejecting, WebhookSink() as webhook, VoiceSink() as voice:
        hanging.hang_after_data = True
        rejecting.reject_rcpt = True
        webhook.timeout_first_n = 1
        voice.status_500 = True
        smtp_timeout = deploy(conn, kernel_schema, contacts=1, provider="smtp",
                              settings={**hanging.provider_settings(), "timeout_s": 0.5})
        smtp_reject = deploy(conn, kernel_schema, contacts=2, provider="smtp", settings=rejecting.provider_settings())
        smtp_refused = deploy(conn, kernel_schema, contacts=1, provider="smtp",
                              settings={**rejecting.provider_settings(), "port": refused_port()})
        webhook_timeout = deploy(conn, kernel_schema, contacts=1, provider="webhook",
                                 settings={**webhook.provider_settings(), "timeout_s": 0.5})
        voice_500 = deploy(conn, kernel_schema, contacts=1, channel="voice", provider="twilio",
                           settings=voice.provider_settings())
        run_until_idle(db_dsn, kernel_schema, env={"VOICE_SINK_AUTH_TOKEN": voice.auth_token})

        # Timed out after the data went out, and SMTP cannot deduplicate: honest unknown.
        assert item_counts(conn, [smtp_timeout]) == {"unknown": 1}
        assert len(hanging.messages) == 1
        # A permanent 550 is failed at once.
        assert item_counts(conn, [smtp_reject]) == {"failed": 2}
        # Refused connections are certainly not delivered: retried with the same key, then failed.
        assert item_counts(conn, [smtp_refused]) == {"failed": 1}
        assert "gave up after 5 dispatches" in errors(conn, smtp_refused)[0]
        # The webhook timed out once, was re-sent with the same key, and the receiver has it once.
        assert item_counts(conn, [webhook_timeout]) == {"sent": 1}
        assert len(webhook.deliveries_by_key) == 1
        assert len(webhook.deliveries) == 1 and webhook.duplicate_attempts == 1
        # A 5xx from a provider that cannot deduplicate may have placed the call: unknown.
        assert item_counts(conn, [voice_500]) == {"unknown": 1}
    statuses = dict(conn.execute(
        "SELECT id, status FROM campaign_runs WHERE id = ANY(%s)",
        ([smtp_timeout, smtp_reject, smtp_refused, webhook_timeout, voice_500],)).fetchall())
    assert statuses == {smtp_timeout: "failed", smtp_reject: "failed", smtp_refused: "failed",
                        webhook_timeout: "completed", voice_500: "failed"}


def test_missing_secret_fails_every_contact_with_the_reason(conn, db_dsn, kernel_schema):
    with VoiceSink() as voice:
        run_id = deploy(conn, kernel_schema, contacts=3, channel="voice", provider="twilio",
                        settings={**voice.provider_settings(), "auth_token_env": "KERNEL_TEST_UNSET_TOKEN"})
        run_until_idle(db_dsn, kernel_schema)
    assert item_counts(conn, [run_id]) == {"failed": 3}
    assert all("KERNEL_TEST_UNSET_TOKEN" in error for error in errors(conn, run_id))
    # The fix is a retry: it targets exactly those contacts.
    retry_id = Kernel(conn, kernel_schema).retry_campaign_run(run_id)
    assert conn.execute("SELECT sum(cardinality(contact_ids)) FROM job_queue WHERE run_id = %s",
                        (retry_id,)).fetchone()[0] == 3


def test_an_unexpected_refusal_abandons_only_that_job(conn, db_dsn, kernel_schema):
    healthy = deploy(conn, kernel_schema, contacts=20, provider="noop")
    broken = deploy(conn, kernel_schema, contacts=3, provider="noop")
    # Corrupt the snapshot (only a superuser can): a contact listed twice gets one item, so
    # the kernel refuses to end the job (KE007) however often it is tried.
    conn.execute("UPDATE job_queue SET contact_ids = contact_ids || contact_ids[1], max_attempts = 2"
                 " WHERE run_id = %s", (broken,))
    output = run_until_idle(db_dsn, kernel_schema, "--lease-seconds", "1")
    assert "the kernel would not end it" in output
    assert item_counts(conn, [healthy]) == {"sent": 20}
    statuses = dict(conn.execute("SELECT id, status FROM campaign_runs").fetchall())
    assert statuses == {healthy: "completed", broken: "failed"}
    assert "gave up after 2 attempts" in conn.execute(
        "SELECT last_error FROM job_queue WHERE run_id = %s", (broken,)).fetchone()[0]


def test_daemon_survives_losing_its_database_connections(conn, db_dsn, kernel_schema):
    run_id = deploy(conn, kernel_schema, contacts=200, provider="noop", settings={"latency_ms": 20})
    daemon = start_daemon(db_dsn, kernel_schema, "--until-idle", "--lease-seconds", "1", "--concurrency", "2")
    wait_until(lambda: item_counts(conn, [run_id]).get("sent", 0) > 20)
    # What a failover or a DBA's pg_terminate_backend does to a running daemon.
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchone()[0]
    output = daemon.wait(timeout=120)
    assert killed >= 2  # its work and LISTEN connections, at least
    assert daemon.returncode == 0, output
    assert "reconnecting" in output
    # noop deduplicates, so whatever was in flight went out again with its key: all sent.
    assert item_counts(conn, [run_id]) == {"sent": 200}

"""`kernel-driver runs show` and `runs list` on runs a real daemon executed."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from kernel_driver.testing.sinks import SmtpSink
from tests.integration.daemon import client_dsn, run_until_idle


@pytest.fixture
def sink():
    with SmtpSink() as running:
        yield running


@pytest.fixture
def finished_run(conn, db_dsn, kernel_schema, sink):
    """A finished run of two jobs with sent, failed and skipped items: (run id, seeded campaign)."""
    seeded = seed_campaign(
        conn, kernel_schema, contacts=6, provider="smtp", settings=sink.provider_settings(),
        unsubscribed_every=3, name="runs show test",
    )
    sink.reject_rcpt = {seeded.address(1, "email")}
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 3)
    run_until_idle(db_dsn, kernel_schema)
    return str(run_id), seeded


@pytest.fixture
def runs_cli(cli, db_dsn, kernel_schema):
    return lambda *args, dsn=db_dsn: cli("--dsn", dsn, "--schema", kernel_schema, "runs", *args)


def test_show_prints_the_run_its_jobs_counts_and_items(runs_cli, finished_run, conn):
    first, seeded = finished_run
    result = runs_cli("show", first)

    assert result.exit_code == 0, result.output
    out = result.output
    assert f"run       {first}" in out
    assert "status    partial (0 of 2 jobs failed; 1 items failed or unknown, 3 sent)" in out
    assert "channel   email via smtp" in out
    assert f"campaign  {seeded.campaign_id} (runs show test)" in out
    assert "lineage   generation 1 of 1" in out
    assert "schedule  priority 0; start at once\n" in out
    assert "jobs (2): completed 2" in out
    job_rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    for (job_id,) in conn.execute("SELECT id FROM job_queue WHERE run_id = %s", (first,)):
        # attempts, contacts, locked_by, lease until, time zone, waits until, error
        assert job_rows[str(job_id)] == ["completed", "1", "3", "-", "-", "-", "-", "-"]
    assert "items (6): failed 1, sent 3, skipped 2" in out
    assert "first 6 of 6 items:" in out
    rejected = seeded.address(1, "email")
    failed_line = next(line for line in out.splitlines() if rejected in line)
    assert "  failed  " in failed_line and "SMTP RCPT answered 550" in failed_line
    assert "unsubscribed" in out  # a skipped item's reason stands in its error column
    sent = conn.execute(
        "SELECT provider_message_id FROM channel_outbox WHERE run_id = %s AND status = 'sent'", (first,)
    )
    for (message_id,) in sent:
        assert message_id in out


def test_show_names_the_lineage_of_a_retry(runs_cli, finished_run, conn, db_dsn, kernel_schema, sink):
    first, _ = finished_run
    sink.reject_rcpt = False
    retry = Kernel(conn, kernel_schema).retry_campaign_run(first)
    run_until_idle(db_dsn, kernel_schema)

    assert f"lineage   generation 1 of 2; retried by {retry}\n" in runs_cli("show", first).output
    out = runs_cli("show", str(retry)).output
    assert f"lineage   generation 2 of 2; retry of {first}; root {first}" in out
    assert "items (1): sent 1" in out
    lines = runs_cli("list").output.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "CHANNEL", "GEN", "PRIORITY", "CREATED", "WAITING", "CAMPAIGN"]
    assert [line.split()[:5] + line.split()[6:7] for line in lines[1:]] == [
        [str(retry), "completed", "email", "2", "0", "-"],
        [first, "partial", "email", "1", "0", "-"],
    ]
    assert len(runs_cli("list", "--limit", "1").output.splitlines()) == 2


def test_show_and_list_say_what_a_run_waits_for(runs_cli, conn, kernel_schema):
    kernel = Kernel(conn, kernel_schema)
    later = seed_campaign(conn, kernel_schema, contacts=2, provider="noop", name="later")
    start = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)  # as PostgreSQL prints it
    scheduled = kernel.deploy_campaign(later.campaign_id, 1, start_at=start, priority=5)
    windowed = seed_campaign(conn, kernel_schema, contacts=1, provider="noop", name="windowed")
    # A window that is closed now, wherever the contact is (UTC): it opens in an hour.
    opens = (datetime.now(UTC) + timedelta(hours=1)).time().replace(microsecond=0)
    closes = (datetime.now(UTC) + timedelta(hours=2)).time().replace(microsecond=0)
    conn.execute("UPDATE campaigns SET send_window_start = %s, send_window_end = %s WHERE id = %s",
                 (opens, closes, windowed.campaign_id))
    waiting = kernel.deploy_campaign(windowed.campaign_id)

    out = runs_cli("show", str(scheduled)).output
    assert f"schedule  priority 5; start {start.isoformat()}" in out
    assert f"jobs (2): scheduled 2 (starts {start.isoformat(sep=' ', timespec='seconds')})" in out
    job_lines = [line.split() for line in out.splitlines() if line.startswith("  ") and "scheduled" in line]
    assert len(job_lines) == 2 and all(line[6:8] == ["-", start.isoformat()] for line in job_lines)
    out = runs_cli("show", str(waiting)).output
    assert f"send window {opens.isoformat()}-{closes.isoformat()} in each contact's time zone" in out
    assert "jobs (1): scheduled 1 (1 jobs wait for their send window)" in out
    assert "  UTC  " in out

    listed = {line.split()[0]: line for line in runs_cli("list").output.splitlines()[1:]}
    assert "  5  " in listed[str(scheduled)] and f"starts {start.isoformat(sep=' ', timespec='seconds')}" in listed[
        str(scheduled)]
    assert "1 jobs wait for their send window" in listed[str(waiting)]


def test_show_items_limits_the_listed_items_not_the_counts(runs_cli, finished_run):
    first, _ = finished_run
    out = runs_cli("show", first, "--items", "2").output
    assert "items (6): failed 1, sent 3, skipped 2" in out
    assert "first 2 of 6 items:" in out
    assert "first" not in runs_cli("show", first, "--items", "0").output.split("items (6)")[1]


def test_show_json_is_run_details(runs_cli, finished_run, conn, kernel_schema):
    first, _ = finished_run
    shown = json.loads(runs_cli("show", first, "--json", "--items", "3").output)
    assert shown == Kernel(conn, kernel_schema).run_details(first, 3)


def test_list_without_runs(runs_cli):
    assert runs_cli("list").output == "no runs\n"


def test_unknown_run_is_not_found_exit_5(runs_cli):
    missing = uuid.uuid4()
    result = runs_cli("show", str(missing))
    assert result.exit_code == 5
    assert result.output == f"error: run {missing} not found\n"


def test_another_tenants_run_is_not_found(runs_cli, finished_run, db_dsn):
    first, _ = finished_run
    stranger = client_dsn(db_dsn, tenant=uuid.uuid4())
    result = runs_cli("show", first, dsn=stranger)
    assert result.exit_code == 5
    assert result.output == f"error: run {first} not found\n"


def test_run_id_must_be_a_uuid(runs_cli):
    result = runs_cli("show", "last-tuesday")
    assert result.exit_code == 2
    assert result.output == "error: run id 'last-tuesday' is not a uuid\n"

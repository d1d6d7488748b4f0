"""The operator's commands (issue 11, part 1) through click's runner on a real database:
`campaigns check`, `deploy`, `runs list` filters, `runs retry`, `runs cancel`, `runs show
--watch` and its timeline."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from kernel_driver.campaigns import ADVICE
from kernel_driver.errors import ExitCode
from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.sql.helpers import drain_run


@pytest.fixture
def kd(cli, db_dsn, kernel_schema):
    return lambda *args, **kw: cli("--dsn", db_dsn, "--schema", kernel_schema, *args, **kw)


@pytest.fixture
def seeded(conn, kernel_schema):
    return seed_campaign(conn, kernel_schema, contacts=3, provider="noop", name="operate test")


def run_row(conn, run_id):
    return conn.execute("SELECT status, priority, start_at, deadline, retry_of_run_id FROM campaign_runs"
                        " WHERE id = %s", (run_id,)).fetchone()


def test_check_lists_every_check_and_passes_a_ready_campaign(kd, seeded):
    result = kd("campaigns", "check", str(seeded.campaign_id), "--workspace", str(seeded.workspace_id))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL", "TO", "DO"]
    names = {line.split()[0] for line in lines[1:-1]}
    # One piece of advice per check the kernel has, and none for a check it does not have.
    assert names == set(ADVICE)
    assert lines[-1] == "ready to deploy"


def test_check_says_what_to_do_and_exits_1_when_not_ready(kd, conn, kernel_schema):
    unready = seed_campaign(conn, kernel_schema, contacts=0, provider="noop")
    result = kd("campaigns", "check", str(unready.campaign_id), "--workspace", str(unready.workspace_id))
    assert result.exit_code == ExitCode.FAILED
    failed = next(line for line in result.output.splitlines() if line.split()[0] == "audience_not_empty")
    assert "FAIL" in failed and ADVICE["audience_not_empty"][:40] in failed
    assert f"error: campaign {unready.campaign_id} is not ready to deploy" in result.output
    shown = json.loads(kd("campaigns", "check", str(unready.campaign_id), "--workspace", str(unready.workspace_id),
                          "--json").output.split("\nerror:")[0])
    assert shown["ready"] is False
    assert {c["check"] for c in shown["checks"] if not c["passed"]} >= {"audience_not_empty"}


def test_deploy_now_at_a_time_and_refused(kd, conn, kernel_schema, seeded):
    result = kd("deploy", str(seeded.campaign_id))
    assert result.exit_code == 0, result.output
    run_id = result.output.split()[2].rstrip(":")
    assert result.output.strip() == f"deployed run {run_id}: starts now, priority 0"
    assert run_row(conn, run_id)[0] == "queued"

    refused = kd("deploy", str(seeded.campaign_id))  # one active run per campaign
    assert refused.exit_code == ExitCode.KERNEL_REFUSED and "active run" in refused.output
    Kernel(conn, kernel_schema).cancel_campaign_run(run_id)

    start = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    result = kd("deploy", str(seeded.campaign_id), "--at", start.isoformat(), "--priority", "7",
                "--deadline", (start + timedelta(hours=2)).isoformat(), "--batch-size", "2", "--json")
    shown = json.loads(result.output)
    assert run_row(conn, shown["id"])[:4] == ("queued", 7, start, start + timedelta(hours=2))
    assert conn.execute("SELECT count(*) FROM job_queue WHERE run_id = %s AND status = 'scheduled'",
                        (shown["id"],)).fetchone()[0] == 2

    unready = seed_campaign(conn, kernel_schema, contacts=0, provider="noop")
    result = kd("deploy", str(unready.campaign_id))
    assert result.exit_code == ExitCode.KERNEL_REFUSED and "audience_not_empty" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--at", "2027-01-04T09:00"], "has no UTC offset"),
    (["--at", "tomorrow"], "is not an ISO 8601 time"),
    (["--priority", "5000"], "5000 is not in the range"),
])
def test_deploy_usage_mistakes_exit_2(kd, seeded, args, message):
    result = kd("deploy", str(seeded.campaign_id), *args)
    assert result.exit_code == ExitCode.USAGE and message in result.output


def test_list_filters_and_json(kd, conn, kernel_schema, seeded):
    kernel = Kernel(conn, kernel_schema)
    first = kernel.deploy_campaign(seeded.campaign_id)
    kernel.cancel_campaign_run(first)
    other = seed_campaign(conn, kernel_schema, contacts=1, provider="noop")
    second = kernel.deploy_campaign(other.campaign_id)

    def listed(*args):
        result = kd("runs", "list", *args)
        assert result.exit_code == 0, result.output
        return [line.split()[0] for line in result.output.splitlines()[1:]] if "no runs" not in result.output else []

    assert listed() == [str(second), str(first)]
    assert listed("--status", "cancelled") == [str(first)]
    assert listed("--campaign", str(other.campaign_id)) == [str(second)]
    assert listed("--tenant", str(seeded.tenant_id)) == [str(first)]
    assert listed("--since", (datetime.now(UTC) + timedelta(minutes=1)).isoformat()) == []
    shown = json.loads(kd("runs", "list", "--json", "--limit", "1").output)
    assert [(r["id"], r["status"], r["campaign"]) for r in shown] == [(str(second), "queued", "seeded campaign")]
    assert kd("runs", "list", "--status", "lost").exit_code == ExitCode.USAGE


def test_cancel_asks_first(kd, conn, kernel_schema, seeded):
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
    declined = kd("runs", "cancel", str(run_id), input="n\n")
    assert declined.exit_code == ExitCode.FAILED and "not confirmed" in declined.output
    assert run_row(conn, run_id)[0] == "queued"
    accepted = kd("runs", "cancel", str(run_id), input="y\n")
    assert accepted.exit_code == 0 and f"run {run_id} cancelled" in accepted.output
    assert run_row(conn, run_id)[0] == "cancelled"
    again = kd("runs", "cancel", str(run_id), "--yes")  # the kernel refuses a finished run
    assert again.exit_code == ExitCode.KERNEL_REFUSED and "cannot be cancelled" in again.output


def test_retry_creates_a_linked_run_that_show_names(kd, conn, kernel_schema, seeded):
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id, 1)
    contacts = iter(["failed", "sent", "sent"])
    drain_run(conn, run_id, lambda item: next(contacts))
    assert run_row(conn, run_id)[0] == "partial"
    result = kd("runs", "retry", str(run_id), "--yes", "--json")
    assert result.exit_code == 0, result.output
    retry = json.loads(result.output)["run_id"]
    assert str(run_row(conn, retry)[4]) == str(run_id)
    shown = kd("runs", "show", str(run_id)).output
    assert f"retried by {retry}" in shown
    only_failed = kd("runs", "show", str(run_id), "--item-status", "failed").output
    assert "first 1 of 1 failed items:" in only_failed
    item_lines = only_failed.split("failed items:")[1].split("timeline")[0].strip().splitlines()[1:]
    assert [line.split()[1] for line in item_lines] == ["failed"]
    timeline = shown.split("timeline (last")[1].splitlines()[1:]
    assert ["processing", "completed"] in [line.split()[3:5] for line in timeline]


def test_show_watch_redraws_until_the_run_ends(kd, conn, kernel_schema, seeded, db_dsn):
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)

    def cancel_soon():
        time.sleep(0.6)
        with psycopg.connect(db_dsn, autocommit=True) as other:
            Kernel(other, kernel_schema).cancel_campaign_run(run_id)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    started = time.monotonic()
    result = kd("runs", "show", str(run_id), "--watch", "--interval", "0.2")
    canceller.join()
    assert result.exit_code == 0
    assert time.monotonic() - started >= 0.5
    assert result.output.count(f"run       {run_id}") >= 2  # drawn more than once
    assert "status    cancelled" in result.output.split(f"run       {run_id}")[-1]  # the last drawing

"""Kernel 1.4 scheduling (issue 10): scheduled starts, priorities and the bound against
starvation, turns between a tenant's runs, send windows in the contact's time zone (across DST)
and run deadlines. kernel.clock() is moved with execution_kernel.clock, as docs/scheduling.md says."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from tests.sql.helpers import (
    add_contacts,
    claim,
    deploy,
    item_row,
    items_of,
    jobs_of,
    refused,
    reserve,
    run_row,
    scalar,
    seed_campaign,
    sent,
    set_clock,
    set_setting,
    step,
    writes_nothing,
)

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- scheduled start ---------------------------------------------------------------------


def test_a_scheduled_run_is_queued_with_its_jobs_scheduled_until_it_starts(conn):
    seed = seed_campaign(conn, 3)
    run_id = scalar(conn, "SELECT deploy_campaign(%s, now() + interval '1 day', p_batch_size => 2)",
                    [seed.campaign_id])
    run = run_row(conn, run_id)
    assert run["status"] == "queued" and run["start_at"] is not None and run["priority"] == 0
    jobs = jobs_of(conn, run_id)
    assert {j["status"] for j in jobs} == {"scheduled"} and len(jobs) == 2
    assert {j["run_after"] for j in jobs} == {run["start_at"]}
    assert claim(conn, "w1", 10) == []
    details = scalar(conn, "SELECT run_details(%s)", [run_id])
    assert details["job_counts"] == {"scheduled": 2} and details["run"]["start_at"] is not None

    set_clock(conn, "now() + interval '1 day'")
    assert {j["run_id"] for j in claim(conn, "w1", 10)} == {run_id}
    assert run_row(conn, run_id)["status"] == "running"


def test_a_scheduled_run_can_be_cancelled_before_it_starts(conn):
    run_id = scalar(conn, "SELECT deploy_campaign(%s, now() + interval '1 hour')", [seed_campaign(conn, 2).campaign_id])
    conn.execute("SELECT cancel_campaign_run(%s)", [run_id])
    assert run_row(conn, run_id)["status"] == "cancelled"
    assert {j["status"] for j in jobs_of(conn, run_id)} == {"cancelled"}
    set_clock(conn, "now() + interval '2 hours'")
    assert claim(conn, "w1", 10) == []


def test_a_start_in_the_past_or_null_starts_at_once_and_seed_forms_keep_working(conn):
    for query in ("SELECT deploy_campaign(%s)", "SELECT deploy_campaign(%s, 1)",
                  "SELECT deploy_campaign(%s, now() - interval '1 minute')",
                  "SELECT deploy_campaign(%s, NULL, 7)"):
        run_id = scalar(conn, query, [seed_campaign(conn, 1).campaign_id])
        assert run_row(conn, run_id)["start_at"] is None, query
        assert {j["status"] for j in jobs_of(conn, run_id)} == {"queued"}, query
    assert run_row(conn, run_id)["priority"] == 7


def test_deploy_refuses_a_bad_schedule_and_writes_nothing(conn):
    seed = seed_campaign(conn, 1)
    cases = {
        "priority": ("SELECT deploy_campaign(%s, NULL, 5000)", ["priority", "5000"]),
        "deadline": ("SELECT deploy_campaign(%s, now() + interval '2 hours', NULL, now() + interval '1 hour')",
                     ["deadline", "not after the start"]),
        "past deadline": ("SELECT deploy_campaign(%s, NULL, NULL, now() - interval '1 hour')", ["deadline"]),
    }
    for case, (query, mentions) in cases.items():
        with writes_nothing(conn), refused(conn, "KE008", *mentions, case=case):
            conn.execute(query, [seed.campaign_id])


def test_an_untyped_start_literal_is_ambiguous_and_a_typed_one_is_not(conn):
    # (uuid, integer) and (uuid, timestamptz, ...) both take two arguments: PostgreSQL cannot
    # tell an unknown literal's type. docs/EXECUTION_CONTRACT.md tells callers to cast it.
    seed = seed_campaign(conn, 1)
    with refused(conn, "42725", "deploy_campaign"):
        conn.execute("SELECT deploy_campaign(%s, '2030-01-01 09:00+00')", [seed.campaign_id])
    run_id = scalar(conn, "SELECT deploy_campaign(%s, '2030-01-01 09:00+00'::timestamptz)", [seed.campaign_id])
    assert run_row(conn, run_id)["start_at"] == at("2030-01-01T09:00:00+00:00")


# --- priorities and turns within a tenant ------------------------------------------------


def two_runs_of_one_tenant(conn, big: int, small: int, **deploy_args):
    a = seed_campaign(conn, big)
    b = seed_campaign(conn, small, tenant_id=a.tenant_id, workspace_id=a.workspace_id)
    big_run = deploy(conn, a.campaign_id, 1)
    query = "SELECT deploy_campaign(%s, NULL, %s, p_batch_size => 1)"
    small_run = scalar(conn, query, [b.campaign_id, deploy_args.get("priority", 0)])
    return big_run, small_run


def test_runs_of_one_tenant_take_turns(conn):
    big_run, small_run = two_runs_of_one_tenant(conn, 50, 1)
    # Before 1.4 the tenant's second campaign waited behind all 50 jobs of its first.
    assert sorted(str(j["run_id"]) for j in claim(conn, "w1", 2)) == sorted([str(big_run), str(small_run)])


def test_higher_priority_is_claimed_first_within_a_tenant(conn):
    low, high = two_runs_of_one_tenant(conn, 5, 3, priority=10)
    assert [j["run_id"] for j in claim(conn, "w1", 3)] == [high] * 3
    assert {j["run_id"] for j in claim(conn, "w1", 10)} == {low}


def test_low_priority_due_for_five_minutes_takes_turns_with_the_top_priority(conn):
    low, high = two_runs_of_one_tenant(conn, 5, 5, priority=10)
    set_clock(conn, "now() + interval '4 minutes'")
    assert {j["run_id"] for j in claim(conn, "w1", 2)} == {high}
    set_clock(conn, "now() + interval '6 minutes'")
    # Both have now waited over 5 minutes: they share the claim in turns.
    assert sorted(str(j["run_id"]) for j in claim(conn, "w1", 2)) == sorted([str(low), str(high)])


def test_a_claim_fills_itself_from_many_one_contact_runs_of_a_tenant(conn):
    # A tenant's transactional messages: one run each. A claim of 16 takes 16 (an early 1.4
    # walked 8 runs a claim: it took 8, and the daemon then waited a poll interval).
    first = seed_campaign(conn, 1)
    runs = [deploy(conn, first.campaign_id)] + [
        deploy(conn, seed_campaign(conn, 1, tenant_id=first.tenant_id, workspace_id=first.workspace_id).campaign_id)
        for _ in range(24)]
    assert len({j["run_id"] for j in claim(conn, "w1", 16)}) == 16
    assert len(claim(conn, "w1", 16)) == len(runs) - 16


def test_a_large_claim_fills_itself_from_one_contact_runs_too(conn):
    # A daemon at --concurrency 500 claims hundreds of one-contact jobs at once: the walk looks
    # at as many runs as the tenant's share (a cap of 64 runs would leave it short and waiting).
    first = seed_campaign(conn, 1)
    add = "SELECT deploy_campaign(%s)"
    scalar(conn, add, [first.campaign_id])
    for _ in range(149):
        more = seed_campaign(conn, 1, tenant_id=first.tenant_id, workspace_id=first.workspace_id)
        scalar(conn, add, [more.campaign_id])
    assert len(claim(conn, "w1", 150)) == 150


def test_the_highest_priority_run_goes_first_among_many(conn):
    # More runs than a claim looks at: the walk goes in priority order, so the one urgent run
    # is found whatever the random start.
    first = seed_campaign(conn, 1)
    for _ in range(80):
        deploy(conn, seed_campaign(conn, 1, tenant_id=first.tenant_id, workspace_id=first.workspace_id).campaign_id)
    urgent = scalar(conn, "SELECT deploy_campaign(%s, NULL, 50)", [first.campaign_id])
    assert [j["run_id"] for j in claim(conn, "w1", 1)] == [urgent]


def test_the_campaign_priority_is_the_default_of_its_runs(conn):
    seed = seed_campaign(conn, 1)
    conn.execute("UPDATE campaigns SET priority = 3 WHERE id = %s", [seed.campaign_id])
    run_id = deploy(conn, seed.campaign_id)
    assert run_row(conn, run_id)["priority"] == 3 and {j["priority"] for j in jobs_of(conn, run_id)} == {3}


# --- send windows ------------------------------------------------------------------------


@pytest.mark.parametrize(("zone", "at_text", "expected"), [
    # inside: the moment itself
    ("Europe/Paris", "2026-06-01 10:00+00", "2026-06-01 10:00+00"),
    # before it opens today (Paris is UTC+2 in summer)
    ("Europe/Paris", "2026-06-01 05:00+00", "2026-06-01 06:00+00"),
    # after it closed: tomorrow's opening
    ("Europe/Paris", "2026-06-01 20:00+00", "2026-06-02 06:00+00"),
    # New York springs forward on 2026-03-08: 08:00 is 13:00 UTC the day before, 12:00 UTC that day
    ("America/New_York", "2026-03-07 02:00+00", "2026-03-07 13:00+00"),
    ("America/New_York", "2026-03-08 02:00+00", "2026-03-08 12:00+00"),
    # and falls back on 2026-11-01: 08:00 is 12:00 UTC the day before, 13:00 UTC that day
    ("America/New_York", "2026-10-31 02:00+00", "2026-10-31 12:00+00"),
    ("America/New_York", "2026-11-01 02:00+00", "2026-11-01 13:00+00"),
    # the night the clocks fall back, 01:30 local happens twice and both are outside
    ("America/New_York", "2026-11-01 06:30+00", "2026-11-01 13:00+00"),
])
def test_send_window_opens_in_local_time_across_dst(conn, zone, at_text, expected):
    window = '{"start": "08:00", "end": "21:00"}'
    assert scalar(conn, "SELECT send_window_opens(%s, %s, %s)", [window, zone, at_text]) == at(expected)


def test_a_window_may_wrap_midnight(conn):
    window = '{"start": "22:00", "end": "06:00"}'
    found = [scalar(conn, "SELECT send_window_opens(%s, 'UTC', %s)", [window, t])
             for t in ("2026-06-01 23:00+00", "2026-06-02 05:59+00", "2026-06-02 06:00+00")]
    assert found == [at("2026-06-01T23:00:00+00:00"), at("2026-06-02T05:59:00+00:00"),
                     at("2026-06-02T22:00:00+00:00")]


def windowed_campaign(conn, zones: dict[str | None, int], window=("08:00", "21:00"), workspace_zone="UTC"):
    """A voice campaign with a daily window; ``zones`` maps a contact time zone (None: the
    workspace's) to how many contacts have it."""
    seed = seed_campaign(conn, 0, channel="voice")
    conn.execute("INSERT INTO workspaces (id, tenant_id, time_zone) VALUES (%s, %s, %s)"
                 " ON CONFLICT (id) DO UPDATE SET time_zone = excluded.time_zone",
                 [seed.workspace_id, seed.tenant_id, workspace_zone])
    conn.execute("UPDATE campaigns SET send_window_start = %s, send_window_end = %s WHERE id = %s",
                 [*window, seed.campaign_id])
    for zone, count in zones.items():
        ids = add_contacts(conn, seed.campaign_id, count)
        conn.execute("UPDATE contacts SET time_zone = %s WHERE id = ANY (%s)", [zone, ids])
    return seed


def test_jobs_are_cut_per_time_zone_and_wait_for_their_window(conn):
    # 12:00 UTC: 08:00 in New York (open), 21:00 in Tokyo (closed), 12:00 in UTC (open).
    set_clock(conn, "'2026-06-01 12:00+00'")
    seed = windowed_campaign(conn, {"America/New_York": 3, "Asia/Tokyo": 2, None: 1})
    run_id = deploy(conn, seed.campaign_id, 2)
    jobs = {(j["time_zone"], j["status"], j["run_after"], len(j["contact_ids"])) for j in jobs_of(conn, run_id)}
    assert jobs == {
        ("America/New_York", "queued", at("2026-06-01T12:00:00+00:00"), 2),
        ("America/New_York", "queued", at("2026-06-01T12:00:00+00:00"), 1),
        ("Asia/Tokyo", "scheduled", at("2026-06-01T23:00:00+00:00"), 2),
        ("UTC", "queued", at("2026-06-01T12:00:00+00:00"), 1),
    }
    assert run_row(conn, run_id)["run_config"]["send_window"] == {"start": "08:00:00", "end": "21:00:00"}
    assert {j["time_zone"] for j in claim(conn, "w1", 10)} == {"America/New_York", "UTC"}
    set_clock(conn, "'2026-06-01 23:00+00'")
    assert {j["time_zone"] for j in claim(conn, "w1", 10)} == {"Asia/Tokyo"}


def test_a_job_whose_window_closes_is_paused_after_its_calls_and_resumes_when_it_opens(conn):
    set_clock(conn, "'2026-06-01 20:59+00'")
    seed = windowed_campaign(conn, {"UTC": 3})
    run_id = deploy(conn, seed.campaign_id)
    out = step(conn, claim=1, want=1)
    [job] = out["job"]
    [first] = out["item"]
    set_clock(conn, "'2026-06-01 21:00+00'")  # closed, one call still in flight: kept, nothing new
    out = step(conn, held=[job["job_id"]], want=5)
    assert not out["item"] and not out["paused"]
    out = step(conn, held=[job["job_id"]], results=sent([first]), want=5)
    [paused] = out["paused"]
    assert paused["detail"]["run_after"] == "2026-06-02T08:00:00+00:00" and not out["item"]
    row = jobs_of(conn, run_id)[0]
    assert (row["status"], row["attempts"], row["locked_by"]) == ("scheduled", 0, None)
    assert "outside the send window (08:00:00-21:00:00, UTC) until" in row["last_error"]
    assert run_row(conn, run_id)["status"] == "running"
    assert step(conn, claim=1, want=5)["job"] == []

    set_clock(conn, "'2026-06-02 08:00+00'")
    out = step(conn, claim=1, want=5)
    assert [j["job_id"] for j in out["job"]] == [job["job_id"]] and len(out["item"]) == 2
    out = step(conn, held=[job["job_id"]], results=sent(out["item"]), complete=[job["job_id"]])
    assert run_row(conn, run_id)["status"] == "completed"
    assert {item_row(conn, i["id"])["status"] for i in items_of(conn, "run_id", run_id)} == {"sent"}


def test_what_the_window_cannot_reach_before_the_deadline_fails_with_the_reason(conn):
    set_clock(conn, "'2026-06-01 22:00+00'")  # closed in UTC until 08:00 tomorrow
    seed = windowed_campaign(conn, {"UTC": 2, "America/Los_Angeles": 1})  # 15:00 in LA: open
    run_id = scalar(conn, "SELECT deploy_campaign(%s, NULL, NULL, '2026-06-02 06:00+00')", [seed.campaign_id])
    utc_job = next(j for j in jobs_of(conn, run_id) if j["time_zone"] == "UTC")
    assert (utc_job["status"], utc_job["run_after"]) == ("scheduled", at("2026-06-02T06:00:00+00:00"))
    out = step(conn, claim=5, want=5)
    done = step(conn, held=[j["job_id"] for j in out["job"]], results=sent(out["item"]),
                complete=[j["job_id"] for j in out["job"]])
    assert len(done["done"]) == 1

    set_clock(conn, "'2026-06-02 06:00+00'")  # the deadline: the UTC job comes due and ends
    out = step(conn, claim=5, want=5)
    assert [j["job_id"] for j in out["job"]] == [utc_job["id"]] and not out["item"]
    [ended] = out["done"]
    assert ended["detail"]["job_status"] == "failed"
    items = [i for i in items_of(conn, "run_id", run_id) if i["status"] != "sent"]
    assert len(items) == 2 and {i["status"] for i in items} == {"failed"}
    assert {i["error"] for i in items} == {
        "the run's deadline (2026-06-02 06:00:00+00) passed before this contact was sent to"}
    run = run_row(conn, run_id)
    assert run["status"] == "partial"


def test_reserve_outbox_items_sends_nothing_outside_the_window(conn):
    set_clock(conn, "'2026-06-01 12:00+00'")
    seed = windowed_campaign(conn, {"UTC": 2})
    deploy(conn, seed.campaign_id)
    set_setting(conn, "execution_kernel.lease_seconds", 60)
    [job] = claim(conn, "w1", 1)
    set_clock(conn, "'2026-06-01 22:00+00'")
    assert reserve(conn, job["id"], "w1", 5) == []
    set_clock(conn, "'2026-06-01 12:30+00'")
    assert len(reserve(conn, job["id"], "w1", 5)) == 2


def test_an_unknown_time_zone_is_refused_with_its_name(conn):
    seed = seed_campaign(conn, 1)
    with writes_nothing(conn), refused(conn, "22023", "Mars/Olympus_Mons"):
        conn.execute("UPDATE contacts SET time_zone = 'Mars/Olympus_Mons' WHERE id = %s", [seed.contact_ids[0]])
    with refused(conn, "22023", "Nowhere"):
        conn.execute("UPDATE workspaces SET time_zone = 'Nowhere' WHERE id = %s", [seed.workspace_id])
    with refused(conn, "23514", "campaigns_send_window_check"):
        conn.execute("UPDATE campaigns SET send_window_start = '08:00' WHERE id = %s", [seed.campaign_id])


def test_the_clock_setting_moves_only_the_session_that_sets_it(conn, connect):
    set_clock(conn, "'2030-01-01 00:00+00'")
    other: psycopg.Connection = connect()
    assert scalar(conn, "SELECT clock()") == at("2030-01-01T00:00:00+00:00")
    assert abs((scalar(other, "SELECT clock()") - dt.datetime.now(UTC)).total_seconds()) < 60

"""claim_queued_jobs, leases, heartbeats, release, fencing (KE005) and exhausted attempts."""

from __future__ import annotations

import time

from tests.sql.helpers import (
    claim,
    claim_one,
    complete,
    deploy,
    deploy_and_claim,
    dispatch,
    expire_lease,
    item_row,
    job_row,
    jobs_of,
    record,
    refused,
    reserve,
    result,
    rows,
    run_job,
    run_row,
    scalar,
    seed_campaign,
    set_clock,
    set_setting,
    statuses,
)


def test_claim_takes_a_queued_job_and_starts_the_run(conn):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id)
    set_setting(conn, "execution_kernel.lease_seconds", 60)
    job = claim_one(conn, "w1")
    assert job["run_id"] == run_id
    assert (job["status"], job["attempts"], job["locked_by"]) == ("processing", 1, "w1")
    assert job["locked_at"] is not None
    lease = scalar(conn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM job_queue WHERE id = %s",
                   [job["id"]])
    assert 55 < lease <= 60
    run = run_row(conn, run_id)
    assert run["status"] == "running" and run["started_at"] is not None
    events = rows(conn, "SELECT entity, from_status, to_status, worker, detail FROM job_events"
                  " WHERE run_id = %s ORDER BY id", [run_id])
    assert events[1:] == [
        {"entity": "job", "from_status": "queued", "to_status": "processing", "worker": "w1", "detail": "attempt 1"},
        {"entity": "run", "from_status": "queued", "to_status": "running", "worker": None, "detail": None},
    ]


def test_claim_respects_max_jobs_and_claims_nothing_twice(conn):
    seed = seed_campaign(conn, 5)
    deploy(conn, seed.campaign_id, 1)
    first = claim(conn, "w1", 3)
    second = claim(conn, "w2", 3)
    assert len(first) == 3 and len(second) == 2
    assert not {j["id"] for j in first} & {j["id"] for j in second}
    assert claim(conn, "w3", 3) == []


def test_default_lease_is_thirty_seconds(conn):
    deploy_and_claim(conn, 1)
    assert scalar(conn, "SELECT lease_expires_at - locked_at = interval '30 seconds' FROM job_queue")


def test_scheduled_jobs_are_claimed_only_once_they_come_due(conn):
    # 1.4: a job that may not go yet is 'scheduled' (queued means due); a claim promotes it
    # once its run_after has passed by kernel.clock().
    now_run = deploy(conn, seed_campaign(conn, 1).campaign_id)
    later_run = scalar(conn, "SELECT deploy_campaign(%s, now() + interval '1 hour')",
                       [seed_campaign(conn, 1).campaign_id])
    [later] = jobs_of(conn, later_run)
    assert later["status"] == "scheduled"
    assert [j["run_id"] for j in claim(conn, "w1", 10)] == [now_run]
    assert claim(conn, "w2", 10) == []
    set_clock(conn, "now() + interval '1 hour'")
    assert [j["id"] for j in claim(conn, "w2", 10)] == [later["id"]]
    assert [(e["from_status"], e["to_status"]) for e in rows(
        conn, "SELECT from_status, to_status FROM job_events WHERE job_id = %s ORDER BY id", [later["id"]])] == [
        ("scheduled", "queued"), ("queued", "processing")]


def test_claim_order_is_priority_then_age(conn):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id, 1)
    a, b, c = jobs_of(conn, run_id)
    conn.execute("UPDATE job_queue SET priority = 5 WHERE id = %s", [c["id"]])
    conn.execute("UPDATE job_queue SET run_after = run_after - interval '1 minute' WHERE id = %s", [b["id"]])
    assert [j["id"] for j in claim(conn, "w1", 3)] == [c["id"], b["id"], a["id"]]


def tenant_of(conn, job) -> object:
    return scalar(conn, "SELECT tenant_id FROM job_queue WHERE id = %s", [job["id"]])


def test_claims_take_turns_between_tenants(conn):
    """Every tenant's first job before any tenant's second, whatever the order of the deploys."""
    seeds = [seed_campaign(conn, n) for n in (10, 10, 1)]
    for seed in seeds:
        deploy(conn, seed.campaign_id, 1)
    first = claim(conn, "w1", 3)
    assert sorted(str(tenant_of(conn, j)) for j in first) == sorted(str(s.tenant_id) for s in seeds)
    # One job per claim from here: the tenants with fewer jobs in flight go first.
    taken = [tenant_of(conn, claim_one(conn, "w1")) for _ in range(8)]
    assert {tenant: taken.count(tenant) for tenant in set(taken)} == {seeds[0].tenant_id: 4, seeds[1].tenant_id: 4}


def test_a_backlog_does_not_delay_another_tenants_first_job(conn):
    backlog = seed_campaign(conn, 200)
    deploy(conn, backlog.campaign_id, 1)
    assert len(claim(conn, "w1", 5)) == 5  # tenant A's jobs in flight
    late = seed_campaign(conn, 1)
    run_id = deploy(conn, late.campaign_id)  # deployed after 195 queued jobs of A

    assert claim_one(conn, "w2")["run_id"] == run_id


def test_a_share_another_tenant_cannot_fill_goes_to_one_that_can(conn):
    big, one = seed_campaign(conn, 30), seed_campaign(conn, 1)
    deploy(conn, big.campaign_id, 1)
    deploy(conn, one.campaign_id, 1)
    jobs = claim(conn, "w1", 10)  # a share of 5 each; the second tenant has one job
    assert len(jobs) == 10
    assert sorted(str(tenant_of(conn, j)) for j in jobs) == sorted([str(big.tenant_id)] * 9 + [str(one.tenant_id)])


def test_a_daemon_given_a_tenant_claims_only_its_jobs(conn):
    seeds = [seed_campaign(conn, 3) for _ in range(3)]
    for seed in seeds:
        deploy(conn, seed.campaign_id, 1)
    jobs = rows(conn, "SELECT * FROM _claim_jobs('w1', 10, interval '30 seconds', %s)", [[seeds[1].tenant_id]])
    assert len(jobs) == 3 and {j["tenant_id"] for j in jobs} == {seeds[1].tenant_id}


def test_a_daemon_given_several_tenants_takes_them_in_turns_and_no_other(conn):
    seeds = [seed_campaign(conn, 5) for _ in range(3)]
    for seed in seeds:
        deploy(conn, seed.campaign_id, 1)
    mine = [seeds[0].tenant_id, seeds[2].tenant_id]
    jobs = rows(conn, "SELECT * FROM _claim_jobs('w1', 4, interval '30 seconds', %s)", [mine])
    assert sorted(str(j["tenant_id"]) for j in jobs) == sorted([str(t) for t in mine] * 2)
    jobs = rows(conn, "SELECT * FROM _claim_jobs('w1', 100, interval '30 seconds', %s)", [mine])
    assert len(jobs) == 6 and seeds[1].tenant_id not in {j["tenant_id"] for j in jobs}


def test_heartbeat_extends_the_lease(conn):
    _, _, job = deploy_and_claim(conn, 1)
    before = scalar(conn, "SELECT lease_expires_at FROM job_queue")
    set_setting(conn, "execution_kernel.lease_seconds", 120)
    until = scalar(conn, "SELECT heartbeat_job(%s, 'w1')", [job["id"]])
    assert until > before
    assert scalar(conn, "SELECT lease_expires_at FROM job_queue") == until
    assert scalar(conn, "SELECT count(*) FROM job_events WHERE job_id = %s", [job["id"]]) == 1


def test_release_gives_the_job_back(conn):
    _, _run_id, job = deploy_and_claim(conn, 1)
    conn.execute("SELECT release_job(%s, 'w1', 'shutting down')", [job["id"]])
    released = rows(conn, "SELECT status, locked_by, lease_expires_at, last_error, attempts FROM job_queue")
    assert released == [{"status": "queued", "locked_by": None, "lease_expires_at": None,
                         "last_error": "shutting down", "attempts": 1}]
    again = claim_one(conn, "w2")
    assert (again["id"], again["attempts"], again["locked_by"]) == (job["id"], 2, "w2")


def test_lease_expiry_lets_another_worker_reclaim_and_fences_the_old_one(conn):
    set_setting(conn, "execution_kernel.lease_seconds", 1)
    _, _run_id, job = deploy_and_claim(conn, 3, "old")
    items = reserve(conn, job["id"], "old", 2)
    dispatch(conn, job["id"], "old", [items[0]["id"]])
    assert claim(conn, "new", 1) == []  # lease still held
    time.sleep(1.1)
    taken = claim_one(conn, "new")
    assert (taken["id"], taken["status"], taken["attempts"], taken["locked_by"]) == (
        job["id"], "processing", 2, "new",
    )
    event = rows(conn, "SELECT from_status, to_status, worker, detail FROM job_events"
                 " WHERE job_id = %s ORDER BY id DESC LIMIT 1", [job["id"]])
    assert event == [{"from_status": "processing", "to_status": "processing", "worker": "new", "detail": "attempt 2"}]

    set_setting(conn, "execution_kernel.lease_seconds", 60)
    job_id, old_calls = job["id"], [
        ("SELECT reserve_outbox_items(%s, 'old', 10)", []),
        ("SELECT mark_outbox_dispatched(%s, 'old', %s::uuid[])", [[items[1]["id"]]]),
        ("SELECT record_outbox_results(%s, 'old', %s::jsonb)",
         [f'[{{"id": "{items[0]["id"]}", "outcome": "failed"}}]']),
        ("SELECT heartbeat_job(%s, 'old')", []),
        ("SELECT complete_job(%s, false, 'x', 'old')", []),
        ("SELECT release_job(%s, 'old', 'x')", []),
        ("SELECT recover_dispatched_items(%s, 'old', false)", []),
        ("SELECT job_context(%s, 'old')", []),
    ]
    for query, extra in old_calls:
        with refused(conn, "KE005", job_id, "old"):
            conn.execute(query, [job_id, *extra])
    # The new holder is unaffected.
    assert scalar(conn, "SELECT heartbeat_job(%s, 'new')", [job_id]) is not None


def test_a_worker_whose_lease_expired_is_fenced_before_anyone_reclaims(conn):
    _, _, job = deploy_and_claim(conn, 2, "w1")
    items = reserve(conn, job["id"], "w1")
    dispatch(conn, job["id"], "w1", [items[0]["id"]])
    expire_lease(conn, job["id"])
    with refused(conn, "KE005", job["id"]):
        record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
    with refused(conn, "KE005", job["id"]):
        complete(conn, job["id"], "w1", success=False)


def test_a_stranger_is_fenced(conn):
    _, _, job = deploy_and_claim(conn, 2, "w1")
    with refused(conn, "KE005", "intruder"):
        reserve(conn, job["id"], "intruder")


def test_a_queued_or_finished_job_cannot_be_worked_on(conn):
    seed = seed_campaign(conn, 1)
    run_id = deploy(conn, seed.campaign_id)
    job_id = jobs_of(conn, run_id)[0]["id"]
    with refused(conn, "KE005", job_id):
        reserve(conn, job_id, "w1")
    claim_one(conn, "w1")
    run_job(conn, job_id, "w1")
    with refused(conn, "KE005", job_id):
        conn.execute("SELECT heartbeat_job(%s, 'w1')", [job_id])


def exhaust(conn, job_id, worker="w1"):
    """Let the job's lease run out and allow no further attempt."""
    conn.execute("UPDATE job_queue SET max_attempts = attempts WHERE id = %s", [job_id])
    expire_lease(conn, job_id)


def test_exhausted_processing_job_fails_on_claim_and_ends_its_items(conn):
    _, run_id, job = deploy_and_claim(conn, 4, "w1")
    items = reserve(conn, job["id"], "w1", 3)  # a fourth contact never reserved
    dispatch(conn, job["id"], "w1", [items[0]["id"], items[1]["id"]])
    record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
    exhaust(conn, job["id"])
    assert claim(conn, "w2", 5) == []
    failed = rows(conn, "SELECT status, locked_by, lease_expires_at, completed_at IS NOT NULL AS done,"
                  " last_error FROM job_queue")[0]
    assert (failed["status"], failed["locked_by"], failed["lease_expires_at"], failed["done"]) == (
        "failed", None, None, True,
    )
    assert "gave up after 1 attempts" in failed["last_error"]
    never_reached = scalar(conn, "SELECT contact_ids[4] FROM job_queue WHERE id = %s", [job["id"]])
    assert statuses(conn, "job_id", job["id"]) == {
        items[0]["contact_id"]: "sent",      # already terminal: untouched
        items[1]["contact_id"]: "unknown",   # dispatched, no outcome: unknowable
        items[2]["contact_id"]: "failed",    # never dispatched: certainly not sent
        never_reached: "failed",             # never reserved: failed too, so a retry targets it
    }
    run = run_row(conn, run_id)
    assert run["status"] == "failed"  # its only job failed
    assert run["completed_at"] is not None and "1 of 1 jobs failed" in run["error_message"]


def test_exhausted_queued_job_fails_on_claim(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    job_id = jobs_of(conn, run_id)[0]["id"]
    claim_one(conn, "w1")
    conn.execute("SELECT release_job(%s, 'w1', 'provider down')", [job_id])
    conn.execute("UPDATE job_queue SET max_attempts = 1 WHERE id = %s", [job_id])
    assert claim(conn, "w2", 1) == []
    job = rows(conn, "SELECT status, attempts, last_error FROM job_queue")[0]
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert "provider down" in job["last_error"]
    assert run_row(conn, run_id)["status"] == "failed"
    transitions = rows(conn, "SELECT from_status, to_status FROM job_events WHERE job_id = %s ORDER BY id", [job_id])
    assert transitions[-1] == {"from_status": "queued", "to_status": "failed"}


def test_exhausted_job_of_a_run_with_a_completed_job_makes_it_partial(conn):
    seed = seed_campaign(conn, 4)
    run_id = deploy(conn, seed.campaign_id, 2)
    first, second = claim(conn, "w1", 2)
    run_job(conn, first["id"], "w1")
    reserve(conn, second["id"], "w1")
    exhaust(conn, second["id"])
    assert claim(conn, "w2", 1) == []
    run = run_row(conn, run_id)
    assert run["status"] == "partial"
    assert "1 of 2 jobs failed" in run["error_message"]


def test_a_queued_run_whose_every_job_is_exhausted_fails_without_running(conn):
    seed = seed_campaign(conn, 1)
    deploy(conn, seed.campaign_id)
    conn.execute("UPDATE job_queue SET attempts = 1, max_attempts = 1")
    assert claim(conn, "w1", 1) == []
    assert rows(conn, "SELECT from_status, to_status FROM job_events WHERE entity = 'run' ORDER BY id") == [
        {"from_status": None, "to_status": "queued"},
        {"from_status": "queued", "to_status": "failed"},
    ]


def test_reclaim_of_an_expired_lease_by_the_same_worker_is_audited(conn):
    _, _, job = deploy_and_claim(conn, 1, "w1")
    expire_lease(conn, job["id"])
    again = claim_one(conn, "w1")
    assert again["attempts"] == 2
    events = rows(conn, "SELECT detail FROM job_events WHERE job_id = %s ORDER BY id", [job["id"]])
    details = [r["detail"] for r in events]
    assert details == ["attempt 1", "attempt 2"]


def test_job_context_gives_the_worker_what_it_needs(conn):
    _seed, run_id, job = deploy_and_claim(conn, 2, channel="voice")
    context = scalar(conn, "SELECT job_context(%s, 'w1')", [job["id"]])
    assert context["run_id"] == str(run_id)
    assert (context["channel"], context["provider"], context["contact_count"]) == ("voice", "twilio", 2)
    assert context["content"]["script"] and context["provider_settings"]["account_sid"] == "AC123"


def test_queue_stats_counts_queued_and_processing(conn):
    seed = seed_campaign(conn, 3)
    deploy(conn, seed.campaign_id, 1)
    claim(conn, "w1", 1)
    stats = {r["status"]: r["jobs"] for r in rows(conn, "SELECT * FROM queue_stats()")}
    assert stats == {"queued": 2, "processing": 1}
    assert scalar(conn, "SELECT min(oldest_age_seconds) FROM queue_stats()") >= 0


def test_hand_backs_given_tenants_release_only_theirs(conn):
    """A daemon serving some tenants (1.7: release_jobs and undispatch_items take them, as its
    steps do) gives back only those tenants' jobs, even when named another's."""
    a, b = seed_campaign(conn, 1), seed_campaign(conn, 1)
    deploy(conn, a.campaign_id)
    deploy(conn, b.campaign_id)
    jobs = {row["tenant_id"]: row["id"] for row in claim(conn, "w1", 2)}
    assert scalar(conn, "SELECT release_jobs('w1', %s::uuid[], 'x', %s::uuid[])",
                  [list(jobs.values()), [a.tenant_id]]) == 1
    assert job_row(conn, jobs[a.tenant_id])["status"] == "queued"
    assert job_row(conn, jobs[b.tenant_id])["status"] == "processing"
    # Items of B's job marked dispatched and unknown to the daemon: left alone for tenant A.
    (item,) = reserve(conn, jobs[b.tenant_id], "w1", 1)
    dispatch(conn, jobs[b.tenant_id], "w1", [item["id"]])
    assert rows(conn, "SELECT * FROM undispatch_items('w1', %s::uuid[], '{}'::uuid[], %s::uuid[])",
                [[jobs[b.tenant_id]], [a.tenant_id]]) == []
    assert item_row(conn, item["id"])["dispatched_at"] is not None
    (back,) = rows(conn, "SELECT * FROM undispatch_items('w1', %s::uuid[], '{}'::uuid[], %s::uuid[])",
                   [[jobs[b.tenant_id]], [b.tenant_id]])
    assert back["id"] == item["id"]

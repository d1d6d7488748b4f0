"""Many sessions at once: SKIP LOCKED claiming, and runs finishing under concurrent completions."""

from __future__ import annotations

import time

import pytest

from tests.sql.helpers import (
    claim,
    complete,
    deploy,
    in_threads,
    jobs_of,
    rows,
    run_row,
    scalar,
    seed_campaign,
    send_items,
    set_setting,
)

CLAIMERS = 8


@pytest.mark.parametrize("tenants", [1, 4])
def test_eight_sessions_claim_a_thousand_jobs_without_overlap(conn, connect, tenants):
    run_ids = [deploy(conn, seed_campaign(conn, 1000 // tenants).campaign_id, 1) for _ in range(tenants)]
    assert scalar(conn, "SELECT count(DISTINCT tenant_id) FROM job_queue") == tenants
    assert scalar(conn, "SELECT count(*) FROM job_queue") == 1000
    sessions = [connect() for _ in range(CLAIMERS)]

    def claim_until_empty(i):
        taken = []
        while batch := claim(sessions[i], f"w{i}", 7):
            taken.extend(j["id"] for j in batch)
        return taken

    claimed = in_threads(CLAIMERS, claim_until_empty)
    errors = [c for c in claimed if isinstance(c, BaseException)]
    assert errors == []
    every = [job for worker in claimed for job in worker]
    assert len(every) == len(set(every)) == 1000  # disjoint, and together all of them
    assert set(every) == {j["id"] for run_id in run_ids for j in jobs_of(conn, run_id)}
    assert sum(1 for c in claimed if c) > 1, "one session took everything: no concurrency happened"
    held = rows(conn, "SELECT locked_by, count(*) AS n, min(attempts) AS lo, max(attempts) AS hi,"
                " bool_and(status = 'processing') AS processing FROM job_queue GROUP BY locked_by")
    assert {h["locked_by"]: h["n"] for h in held} == {f"w{i}": len(c) for i, c in enumerate(claimed) if c}
    assert all(h["lo"] == h["hi"] == 1 and h["processing"] for h in held)
    assert {run_row(conn, run_id)["status"] for run_id in run_ids} == {"running"}
    assert scalar(conn, "SELECT count(*) FROM job_events WHERE entity = 'run' AND to_status = 'running'") == tenants


def complete_together(sessions, jobs):
    """Complete job i from session i, all at once; returns what each call raised (or None)."""
    return in_threads(len(jobs), lambda i: complete(sessions[i], jobs[i]["id"], "w", True))


def test_concurrent_completions_derive_the_run_status_once(conn, connect):
    sessions = [connect() for _ in range(CLAIMERS)]
    for round_ in range(3):  # several rounds: the race window is small
        seed = seed_campaign(conn, CLAIMERS)
        run_id = deploy(conn, seed.campaign_id, 1)
        jobs = claim(conn, "w", CLAIMERS)
        assert len(jobs) == CLAIMERS
        for job in jobs:
            send_items(conn, job["id"], "w")
        assert complete_together(sessions, jobs) == [None] * CLAIMERS, round_
        assert run_row(conn, run_id)["status"] == "completed", round_
        ends = scalar(conn, "SELECT count(*) FROM job_events WHERE run_id = %s AND entity = 'run'"
                      " AND to_status = 'completed'", [run_id])
        assert ends == 1, round_


@pytest.fixture
def slow_job_updates(conn):
    """A test-only trigger: job_queue updates pause 0.5 s in sessions that set test.slow_jobs,
    which holds a claim between locking its jobs and touching their run."""
    conn.execute(
        "CREATE FUNCTION public.test_slow_jobs() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF current_setting('test.slow_jobs', true) = 'on' THEN PERFORM pg_sleep(0.5); END IF;"
        " RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER zz_test_slow_jobs BEFORE UPDATE ON job_queue"
                 " FOR EACH ROW EXECUTE FUNCTION public.test_slow_jobs()")
    yield
    conn.execute("DROP TRIGGER zz_test_slow_jobs ON job_queue")
    conn.execute("DROP FUNCTION public.test_slow_jobs()")


def test_cancel_during_a_claim_does_not_deadlock(conn, connect, slow_job_updates):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id, 1)
    claimer, canceller = connect(), connect()
    set_setting(claimer, "test.slow_jobs", "on")

    def work(i):
        if i == 0:
            return claim(claimer, "w1", 1)
        time.sleep(0.2)  # the claim holds its job and sleeps before it reaches the run
        return canceller.execute("SELECT cancel_campaign_run(%s)", [run_id]).fetchone()

    claimed, cancelled = in_threads(2, work)
    assert not isinstance(claimed, BaseException), claimed
    assert not isinstance(cancelled, BaseException), cancelled
    assert run_row(conn, run_id)["status"] == "cancelled"

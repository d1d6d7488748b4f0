"""Many sessions at once: SKIP LOCKED claiming, and runs finishing under concurrent completions."""

from __future__ import annotations

from helpers import (
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
)

CLAIMERS = 8


def test_eight_sessions_claim_a_thousand_jobs_without_overlap(conn, connect):
    seed = seed_campaign(conn, 1000)
    run_id = deploy(conn, seed.campaign_id, 1)
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
    assert set(every) == {j["id"] for j in jobs_of(conn, run_id)}
    assert sum(1 for c in claimed if c) > 1, "one session took everything: no concurrency happened"
    held = rows(conn, "SELECT locked_by, count(*) AS n, min(attempts) AS lo, max(attempts) AS hi,"
                " bool_and(status = 'processing') AS processing FROM job_queue GROUP BY locked_by")
    assert {h["locked_by"]: h["n"] for h in held} == {f"w{i}": len(c) for i, c in enumerate(claimed) if c}
    assert all(h["lo"] == h["hi"] == 1 and h["processing"] for h in held)
    assert run_row(conn, run_id)["status"] == "running"
    assert scalar(conn, "SELECT count(*) FROM job_events WHERE entity = 'run' AND to_status = 'running'") == 1


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

"""kernel.job_item_counts (1.6): per job and status, how many items it has, kept by statement
triggers on channel_outbox. Every test's end compares them with the items (tests/conftest.py);
these tests show the check can fail, and what the counts cost no one: a daemon recording for
one job never waits for another job's counters, and a tenant sees only its own."""

from __future__ import annotations

import psycopg
import pytest

from tests.sql.helpers import (
    TRIGGERS_BYPASSED,
    as_role,
    claim,
    deploy,
    dispatch,
    record,
    reserve,
    result,
    rows,
    run_job,
    scalar,
    seed_campaign,
    wrong_item_counts,
)


def counts(conn, run_id):
    return {r["status"]: r["n"] for r in rows(
        conn, "SELECT status, sum(items)::int AS n FROM job_item_counts WHERE run_id = %s"
              " GROUP BY status HAVING sum(items) > 0", [run_id])}


def real(conn, run_id):
    return {r["status"]: r["n"] for r in rows(
        conn, "SELECT status, count(*)::int AS n FROM channel_outbox WHERE run_id = %s GROUP BY status", [run_id])}


def test_counts_follow_inserts_outcomes_and_skips(conn, kernel_schema):
    seed = seed_campaign(conn, 10, unsubscribed_every=5)
    run_id = deploy(conn, seed.campaign_id, 5)
    outcomes = iter(["sent", "failed", "unknown", "sent", "sent", "sent", "failed", "sent"])
    for job in claim(conn, "w1", 2):
        run_job(conn, job["id"], "w1", lambda item: next(outcomes))
    assert counts(conn, run_id) == real(conn, run_id) == {"sent": 5, "failed": 2, "unknown": 1, "skipped": 2}
    assert wrong_item_counts(conn, kernel_schema) == []
    # run_details (runs show) reads them.
    assert scalar(conn, "SELECT run_details(%s, 0) -> 'item_counts'", [run_id]) == counts(conn, run_id)


def test_a_dispatch_mark_writes_no_counter_and_a_delete_takes_items_away(conn, kernel_schema):
    seed = seed_campaign(conn, 4)
    run_id = deploy(conn, seed.campaign_id)
    (job,) = claim(conn, "w1", 1)
    items = reserve(conn, job["id"], "w1", 4)
    # Rows this backend wrote into the counters (not yet flushed statistics: compare deltas).
    written = "SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'job_item_counts'::regclass"
    with conn.transaction():
        start = scalar(conn, written)
        dispatch(conn, job["id"], "w1", [i["id"] for i in items])
        assert scalar(conn, written) == start
        record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
        assert scalar(conn, written) == start + 2  # pending -1, sent +1
    assert counts(conn, run_id) == {"pending": 3, "sent": 1}
    conn.execute("DELETE FROM channel_outbox WHERE id = %s", [items[1]["id"]])  # a DBA's purge
    assert counts(conn, run_id) == real(conn, run_id) == {"pending": 2, "sent": 1}


def test_the_check_after_each_test_finds_counts_that_drifted(conn, kernel_schema):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id)
    (job,) = claim(conn, "w1", 1)
    items = reserve(conn, job["id"], "w1", 3)
    TRIGGERS_BYPASSED.add(conn.info.dbname)  # this test breaks them on purpose
    conn.execute("ALTER TABLE channel_outbox DISABLE TRIGGER channel_outbox_counts_update")
    try:
        dispatch(conn, job["id"], "w1", [i["id"] for i in items])
        record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
    finally:
        conn.execute("ALTER TABLE channel_outbox ENABLE TRIGGER channel_outbox_counts_update")
    assert counts(conn, run_id) == {"pending": 3} != real(conn, run_id)
    assert sorted(wrong_item_counts(conn, kernel_schema)) == [(job["id"], "pending", 3, 2), (job["id"], "sent", 0, 1)]


def test_recording_for_one_job_never_waits_for_another_jobs_counters(connect, conn):
    seed = seed_campaign(conn, 4)
    deploy(conn, seed.campaign_id, 2)
    first, second = claim(conn, "w1", 2)
    items = {job["id"]: reserve(conn, job["id"], "w1", 2) for job in (first, second)}
    for job_id, batch in items.items():
        dispatch(conn, job_id, "w1", [i["id"] for i in batch])
    holding = connect()
    with holding.transaction():  # records for the first job and keeps its counter rows locked
        record(holding, first["id"], "w1", [result(i["id"], "sent") for i in items[first["id"]]])
        other = connect()
        other.execute("SET lock_timeout = '2s'")
        record(other, second["id"], "w1", [result(i["id"], "sent") for i in items[second["id"]]])


def test_a_tenant_reads_only_its_own_counts_and_writes_none(conn, connect, kernel_schema):
    a, b = seed_campaign(conn, 2), seed_campaign(conn, 3)
    for seed in (a, b):
        deploy(conn, seed.campaign_id)
    for job in claim(conn, "w1", 2):
        reserve(conn, job["id"], "w1", 5)
    with as_role(connect(), kernel_schema, "reader", a.tenant_id) as reader:
        assert reader.execute("SELECT sum(items)::int FROM job_item_counts").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("UPDATE job_item_counts SET items = 0")
    with as_role(connect(), kernel_schema, "app", b.tenant_id) as app:
        assert app.execute("SELECT sum(items)::int FROM job_item_counts").fetchone()[0] == 3
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("DELETE FROM job_item_counts")

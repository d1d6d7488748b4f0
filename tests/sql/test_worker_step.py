"""worker_step, the daemon's one call per batch: fencing, recording, renewing, ending, claiming
and dispatching in one transaction, with the crash window and fencing of the 1.0 calls."""

from __future__ import annotations

import uuid

from tests.sql.helpers import (
    deploy,
    expire_lease,
    item_row,
    items_of,
    job_row,
    jobs_of,
    refused,
    run_row,
    scalar,
    seed_campaign,
    sent,
    step,
)


def test_one_step_claims_jobs_and_dispatches_their_first_items(conn):
    runs = [deploy(conn, seed_campaign(conn, 1).campaign_id) for _ in range(5)]
    out = step(conn, claim=5, want=5)
    assert {job["run_id"] for job in out["job"]} == set(runs)
    assert all(job["detail"]["remaining"] == 1 and job["detail"]["provider"] for job in out["job"])
    assert len(out["item"]) == 5
    for item in out["item"]:
        row = item_row(conn, item["item_id"])
        assert (row["status"], row["dispatch_count"]) == ("pending", 1) and row["dispatched_at"] is not None
        assert item["idempotency_key"] == row["idempotency_key"] and item["recipient"] == row["recipient"]
    assert {held["detail"]["remaining"] for held in out["held"]} == {0}
    assert {run_row(conn, run_id)["status"] for run_id in runs} == {"running"}


def test_no_more_items_are_dispatched_than_the_window_wants(conn):
    seed = seed_campaign(conn, 20, unsubscribed_every=2)
    run_id = deploy(conn, seed.campaign_id)
    out = step(conn, claim=1, want=3)
    assert len(out["item"]) == 3
    dispatched = [i for i in items_of(conn, "run_id", run_id) if i["dispatched_at"] is not None]
    assert len(dispatched) == 3
    # Items cover a prefix of the snapshot; unsubscribed contacts on the way became skipped
    # items and took no slot.
    items = items_of(conn, "run_id", run_id)
    assert sorted(i["contact_id"] for i in items) == seed.contact_ids[:len(items)]
    assert [i["status"] for i in items].count("pending") == 3
    assert {i["skip_reason"] for i in items if i["status"] == "skipped"} <= {"unsubscribed"}
    job_id = out["job"][0]["job_id"]
    again = step(conn, held=[job_id], want=4)
    assert len(again["item"]) == 4
    assert not {i["item_id"] for i in again["item"]} & {i["item_id"] for i in out["item"]}


def test_results_are_recorded_and_the_job_and_run_end_in_the_same_step(conn):
    run_id = deploy(conn, seed_campaign(conn, 2).campaign_id)
    out = step(conn, claim=1, want=10)
    job_id = out["job"][0]["job_id"]
    done = step(conn, held=[job_id], results=sent(out["item"]), complete=[job_id], claim=1, want=10)
    assert [(d["job_id"], d["detail"]["job_status"], d["detail"]["run_status"]) for d in done["done"]] == [
        (job_id, "completed", "completed")]
    assert {i["status"] for i in items_of(conn, "run_id", run_id)} == {"sent"}
    assert done["idle"][0]["detail"] == {"queued": False, "processing": False}


def test_a_job_is_not_ended_while_an_item_is_pending(conn):
    deploy(conn, seed_campaign(conn, 2).campaign_id)
    out = step(conn, claim=1, want=10)
    job_id = out["job"][0]["job_id"]
    partly = step(conn, held=[job_id], results=sent(out["item"][:1]), complete=[job_id])
    assert "done" not in partly
    assert job_row(conn, job_id)["status"] == "processing"


def test_a_worker_that_lost_the_lease_records_nothing(conn):
    deploy(conn, seed_campaign(conn, 3).campaign_id)
    out = step(conn, "w1", claim=1, want=3)
    job_id = out["job"][0]["job_id"]
    expire_lease(conn, job_id)
    taken = step(conn, "w2", claim=1, want=0)
    assert [j["job_id"] for j in taken["job"]] == [job_id]
    late = step(conn, "w1", held=[job_id], results=sent(out["item"]), complete=[job_id], want=3)
    assert [row["job_id"] for row in late["lost"]] == [job_id]
    assert "item" not in late and "done" not in late
    # What w1 had dispatched was settled by w2's claim (no dedup: unknown), never recorded by w1.
    assert {item_row(conn, i["item_id"])["status"] for i in out["item"]} == {"unknown"}
    assert job_row(conn, job_id)["locked_by"] == "w2"


def test_a_provider_that_deduplicates_gets_a_lost_workers_items_back_to_send(conn):
    seed = seed_campaign(conn, 3, provider="noop", settings={})
    deploy(conn, seed.campaign_id)
    out = step(conn, "w1", claim=1, want=2)
    job_id = out["job"][0]["job_id"]
    expire_lease(conn, job_id)
    taken = step(conn, "w2", claim=1, want=0, deduplicating=["noop"])
    assert {w["item_id"] for w in taken["waiting"]} == {i["item_id"] for i in out["item"]}
    again = step(conn, "w2", held=[job_id], redispatch=[w["item_id"] for w in taken["waiting"]], want=3)
    assert {i["item_id"] for i in again["item"]} >= {i["item_id"] for i in out["item"]}
    assert {item_row(conn, i["item_id"])["dispatch_count"] for i in out["item"]} == {2}


def test_a_retry_waits_undispatched_and_fails_after_five_dispatches(conn):
    deploy(conn, seed_campaign(conn, 1).campaign_id)
    out = step(conn, claim=1, want=1)
    job_id, item_id = out["job"][0]["job_id"], out["item"][0]["item_id"]
    for attempt in range(1, 5):
        back = step(conn, held=[job_id], results=[(item_id, "retry", None, "busy")])
        assert [w["item_id"] for w in back["waiting"]] == [item_id]
        assert back["waiting"][0]["detail"]["dispatch_count"] == attempt
        assert item_row(conn, item_id)["dispatched_at"] is None
        again = step(conn, held=[job_id], redispatch=[item_id], want=1)
        assert [i["item_id"] for i in again["item"]] == [item_id]
    last = step(conn, held=[job_id], results=[(item_id, "retry", None, "busy")], complete=[job_id])
    assert item_row(conn, item_id)["status"] == "failed"
    assert "gave up after 5 dispatches" in item_row(conn, item_id)["error"]
    assert last["done"][0]["detail"]["run_status"] == "failed"


def test_a_job_whose_provider_cannot_be_used_fails_every_contact_with_the_reason(conn):
    run_id = deploy(conn, seed_campaign(conn, 5).campaign_id)
    out = step(conn, claim=1, want=2)
    job_id = out["job"][0]["job_id"]
    failed = [(i["item_id"], "failed", None, "no such provider") for i in out["item"]]
    done = step(conn, held=[job_id], results=failed, fail={job_id: "no such provider"})
    assert done["done"][0]["detail"] == {"job_status": "failed", "run_status": "failed"}
    items = items_of(conn, "run_id", run_id)
    assert len(items) == 5 and {i["status"] for i in items} == {"failed"}
    assert {i["error"] for i in items} == {"no such provider"}


def test_a_cancelled_run_ends_its_held_jobs_with_undispatched_items_skipped(conn):
    run_id = deploy(conn, seed_campaign(conn, 6).campaign_id)
    out = step(conn, claim=1, want=2)
    job_id = out["job"][0]["job_id"]
    conn.execute("SELECT cancel_campaign_run(%s)", [run_id])
    seen = step(conn, held=[job_id], want=4)
    assert [c["job_id"] for c in seen["cancelled"]] == [job_id] and "item" not in seen
    done = step(conn, held=[job_id], results=sent(out["item"]), complete=[job_id])
    assert done["done"][0]["detail"]["job_status"] == "cancelled"
    assert run_row(conn, run_id)["status"] == "cancelled"
    assert {i["status"] for i in items_of(conn, "run_id", run_id)} == {"sent"}


def test_leases_are_renewed_once_a_third_is_gone(conn):
    deploy(conn, seed_campaign(conn, 3).campaign_id)
    job_id = step(conn, claim=1, want=0, lease=30)["job"][0]["job_id"]
    before = job_row(conn, job_id)["lease_expires_at"]
    step(conn, held=[job_id], lease=30)
    assert job_row(conn, job_id)["lease_expires_at"] == before  # not a third gone yet: no write
    conn.execute("UPDATE job_queue SET lease_expires_at = now() + interval '15 seconds' WHERE id = %s", [job_id])
    step(conn, held=[job_id], lease=30)
    left = scalar(conn, "SELECT extract(epoch FROM lease_expires_at - now()) FROM job_queue WHERE id = %s", [job_id])
    assert 29 < left <= 30


def test_a_tenant_given_to_the_step_limits_its_claims(conn):
    mine, other = uuid.uuid4(), uuid.uuid4()
    deploy(conn, seed_campaign(conn, 1, tenant_id=other).campaign_id)
    mine_run = deploy(conn, seed_campaign(conn, 1, tenant_id=mine).campaign_id)
    out = step(conn, claim=5, want=5, tenant=mine)
    assert [j["run_id"] for j in out["job"]] == [mine_run]
    assert {j["status"] for j in jobs_of(conn, mine_run)} == {"processing"}


def test_bad_arguments_are_refused_and_write_nothing(conn):
    deploy(conn, seed_campaign(conn, 1).campaign_id)
    with refused(conn, "KE008", "worker"):
        step(conn, None, claim=1, want=1)
    with refused(conn, "KE008", "lease_seconds"):
        step(conn, claim=1, want=1, lease=0)
    with refused(conn, "KE008", "want"):
        step(conn, claim=1, want=-1)
    with refused(conn, "KE008", "malformed results"):
        step(conn, results=[(uuid.uuid4(), "sent", None)])
    with refused(conn, "KE008", "malformed results"):
        step(conn, results=[(uuid.uuid4(), "delivered", "x")])
    assert scalar(conn, "SELECT count(*) FROM job_queue WHERE status = 'processing'") == 0

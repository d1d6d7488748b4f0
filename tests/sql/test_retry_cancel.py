"""cancel_campaign_run, retry_campaign_run (UX2) and run_details (UX1)."""

from __future__ import annotations

import pytest

from tests.sql.helpers import (
    claim,
    claim_one,
    complete,
    deploy,
    deploy_and_claim,
    dispatch,
    drain_run,
    expire_lease,
    finish_run,
    item_row,
    items_of,
    job_row,
    jobs_of,
    record,
    refused,
    reserve,
    result,
    run_job,
    run_row,
    scalar,
    seed_campaign,
    statuses,
)


def cancel(conn, run_id):
    conn.execute("SELECT cancel_campaign_run(%s)", [run_id])


def retry(conn, run_id, include_unknown=None):
    if include_unknown is None:
        return scalar(conn, "SELECT retry_campaign_run(%s)", [run_id])
    return scalar(conn, "SELECT retry_campaign_run(%s, %s)", [run_id, include_unknown])


def targets(conn, run_id):
    return sorted(c for j in jobs_of(conn, run_id) for c in j["contact_ids"])


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_a_queued_run(conn):
    seed = seed_campaign(conn, 4)
    run_id = deploy(conn, seed.campaign_id, 2)
    cancel(conn, run_id)
    run = run_row(conn, run_id)
    assert run["status"] == "cancelled" and run["completed_at"] is not None
    assert "cancelled by" in run["error_message"]
    assert {j["status"] for j in jobs_of(conn, run_id)} == {"cancelled"}
    assert claim(conn, "w1", 5) == []


def test_cancel_a_running_run(conn):
    seed = seed_campaign(conn, 6)
    run_id = deploy(conn, seed.campaign_id, 3)
    job = claim_one(conn, "w1")
    items = reserve(conn, job["id"], "w1")
    dispatch(conn, job["id"], "w1", [items[0]["id"]])
    cancel(conn, run_id)
    queued_job = next(j for j in jobs_of(conn, run_id) if j["id"] != job["id"])
    assert queued_job["status"] == "cancelled"
    assert job_row(conn, job["id"])["status"] == "processing"  # finishes its in-flight calls
    in_flight, *rest = (item_row(conn, i["id"]) for i in items)
    assert (in_flight["status"], in_flight["dispatched_at"] is not None) == ("pending", True)
    assert [(i["status"], i["skip_reason"], i["skipped"]) for i in rest] == [("skipped", "run_cancelled", True)] * 2
    # The in-flight call is still recorded, then the job ends cancelled.
    record(conn, job["id"], "w1", [result(in_flight["id"], "sent")])
    complete(conn, job["id"], "w1", True)
    assert job_row(conn, job["id"])["status"] == "cancelled"
    assert run_row(conn, run_id)["status"] == "cancelled"


@pytest.mark.parametrize("outcome", ["sent", "failed"])
def test_cancelling_a_finished_run_is_refused(conn, outcome):
    seed = seed_campaign(conn, 2)
    run_id = finish_run(conn, seed.campaign_id, outcome)
    with refused(conn, "KE004", run_id):
        cancel(conn, run_id)


def test_cancelling_twice_is_refused(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    cancel(conn, run_id)
    with refused(conn, "KE004", run_id):
        cancel(conn, run_id)


@pytest.fixture
def cancelled_in_flight(conn):
    """w1 holds the job of a 2-contact run, one item dispatched, when the run is cancelled."""
    _, run_id, job = deploy_and_claim(conn, 2, "w1")
    items = reserve(conn, job["id"], "w1")
    dispatch(conn, job["id"], "w1", [items[0]["id"]])
    cancel(conn, run_id)
    return job, items


def test_recovering_a_cancelled_run_with_a_deduplicating_provider_lets_the_job_end(conn, cancelled_in_flight):
    job, _ = cancelled_in_flight
    expire_lease(conn, job["id"])
    claim_one(conn, "w2")
    conn.execute("SELECT recover_dispatched_items(%s, 'w2', true)", [job["id"]])
    assert reserve(conn, job["id"], "w2") == []  # nothing more to send after a cancel
    complete(conn, job["id"], "w2", True)
    assert job_row(conn, job["id"])["status"] == "cancelled"


def test_a_retry_outcome_after_cancel_lets_the_job_end(conn, cancelled_in_flight):
    job, items = cancelled_in_flight
    record(conn, job["id"], "w1", [result(items[0]["id"], "retry", error="421 busy")])
    assert reserve(conn, job["id"], "w1") == []
    complete(conn, job["id"], "w1", True)
    assert job_row(conn, job["id"])["status"] == "cancelled"


# --- retry ----------------------------------------------------------------------------------


def by_contact(outcomes):
    """An outcome function: contact_id → outcome, 'sent' for the rest."""
    return lambda item: outcomes.get(item["contact_id"], "sent")


@pytest.fixture
def finished(conn):
    """A finished run of 5 contacts: c0 failed, c1 unknown, c2..c4 sent."""
    seed = seed_campaign(conn, 5)
    c = seed.contact_ids
    run_id = finish_run(conn, seed.campaign_id, by_contact({c[0]: "failed", c[1]: "unknown"}), batch_size=2)
    assert run_row(conn, run_id)["status"] == "partial"
    return seed, run_id


def test_retry_refused_while_the_run_is_active(conn):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    with refused(conn, "KE011", run_id):
        retry(conn, run_id)
    claim_one(conn, "w1")
    with refused(conn, "KE011", run_id):
        retry(conn, run_id, True)


def test_retry_creates_a_linked_run_for_failed_contacts_only(conn, finished):
    seed, run_id = finished
    new = retry(conn, run_id)
    run = run_row(conn, new)
    assert (run["status"], run["retry_of_run_id"], run["root_run_id"], run["generation"]) == (
        "queued", run_id, run_id, 2,
    )
    assert run["campaign_id"] == seed.campaign_id
    assert run["run_config"]["content"] == run_row(conn, run_id)["run_config"]["content"]
    assert run["run_config"]["include_unknown"] is False
    assert targets(conn, new) == [seed.contact_ids[0]]


def test_retry_rechecks_the_provider_as_configured_now(conn, finished):
    seed, run_id = finished
    conn.execute("UPDATE provider_configs SET settings = '{\"url\": \"ftp://nowhere\"}' WHERE workspace_id = %s",
                 [seed.workspace_id])
    with refused(conn, "KE001", run_id, "provider_settings_valid"):
        retry(conn, run_id)
    conn.execute("DELETE FROM provider_configs WHERE workspace_id = %s", [seed.workspace_id])
    with refused(conn, "KE001", run_id, "provider_configured"):
        retry(conn, run_id)


def test_retry_with_unknown_targets_unknown_contacts_too(conn, finished):
    seed, run_id = finished
    new = retry(conn, run_id, True)
    assert targets(conn, new) == sorted(seed.contact_ids[:2])


def test_retry_items_get_new_keys_and_stay_unique(conn, finished):
    seed, run_id = finished
    new = retry(conn, run_id, True)
    drain_run(conn, new, "sent")
    keys = [i["idempotency_key"] for i in items_of(conn, "root_run_id", run_id)]
    assert len(keys) == len(set(keys)) == 7
    assert {i["idempotency_key"] for i in items_of(conn, "run_id", new)} == {
        f"{run_id}:email:{c}:2" for c in seed.contact_ids[:2]
    }
    assert run_row(conn, new)["status"] == "completed"


def test_retry_of_a_retry(conn, finished):
    seed, run_id = finished
    second = retry(conn, run_id, True)
    drain_run(conn, second, by_contact({seed.contact_ids[0]: "failed"}))
    third = retry(conn, second)
    run = run_row(conn, third)
    assert (run["retry_of_run_id"], run["root_run_id"], run["generation"]) == (second, run_id, 3)
    assert targets(conn, third) == [seed.contact_ids[0]]
    drain_run(conn, third, "sent")
    assert {i["idempotency_key"] for i in items_of(conn, "run_id", third)} == {
        f"{run_id}:email:{seed.contact_ids[0]}:3"
    }


def test_the_latest_item_of_the_lineage_decides(conn, finished):
    seed, run_id = finished
    c0, c1 = seed.contact_ids[:2]
    second = retry(conn, run_id, True)
    drain_run(conn, second, by_contact({c0: "unknown", c1: "failed"}))
    # c0: failed then unknown → only with include_unknown; c1: unknown then failed → always
    assert targets(conn, retry(conn, second)) == [c1]


def test_a_contact_with_a_sent_item_anywhere_in_the_lineage_is_never_targeted(conn, finished):
    seed, run_id = finished
    c0, c2 = seed.contact_ids[0], seed.contact_ids[2]  # c2 was sent in generation 1
    second = retry(conn, run_id)
    job = claim_one(conn, "w1")
    # A later generation item for c2 that fails (made by hand: the kernel would not target c2).
    conn.execute(
        "INSERT INTO channel_outbox (run_id, job_id, tenant_id, workspace_id, channel, provider,"
        " idempotency_key, contact_id, root_run_id, generation)"
        " SELECT %s, %s, tenant_id, workspace_id, 'email', 'smtp', %s, %s, %s, 2"
        " FROM campaigns WHERE id = %s",
        [second, job["id"], f"{run_id}:email:{c2}:2", c2, run_id, seed.campaign_id],
    )
    run_job(conn, job["id"], "w1", "failed")
    assert statuses(conn, "run_id", second) == {c0: "failed", c2: "failed"}
    assert targets(conn, retry(conn, second)) == [c0]


def test_nothing_to_retry(conn):
    seed = seed_campaign(conn, 2)
    run_id = finish_run(conn, seed.campaign_id, "sent")
    with refused(conn, "KE010", run_id):
        retry(conn, run_id, True)


def test_unknown_alone_is_retried_only_when_asked(conn):
    seed = seed_campaign(conn, 2)
    c = seed.contact_ids
    run_id = finish_run(conn, seed.campaign_id, by_contact({c[0]: "unknown"}))
    with refused(conn, "KE010", run_id):
        retry(conn, run_id)
    assert targets(conn, retry(conn, run_id, True)) == [c[0]]


def test_retry_refused_while_another_run_of_the_campaign_is_active(conn, finished):
    seed, run_id = finished
    active = deploy(conn, seed.campaign_id)
    with refused(conn, "KE003", active):
        retry(conn, run_id)


def test_retry_of_a_cancelled_run(conn):
    _, run_id, job = deploy_and_claim(conn, 2)
    items = reserve(conn, job["id"])
    record(conn, job["id"], "w1", [result(items[0]["id"], "failed")])
    cancel(conn, run_id)
    complete(conn, job["id"], "w1", True)
    new = retry(conn, run_id)
    assert targets(conn, new) == [items[0]["contact_id"]]  # not the one skipped by the cancel


def test_contacts_never_attempted_by_a_failed_job_are_retried(conn):
    seed, run_id, job = deploy_and_claim(conn, 3)
    complete(conn, job["id"], "w1", False, "provider down")
    assert run_row(conn, run_id)["status"] == "failed"
    assert targets(conn, retry(conn, run_id)) == seed.contact_ids


# --- run_details ----------------------------------------------------------------------------


def details(conn, run_id, limit=None):
    if limit is None:
        return scalar(conn, "SELECT run_details(%s)", [run_id])
    return scalar(conn, "SELECT run_details(%s, %s)", [run_id, limit])


def test_run_details(conn, finished):
    seed, run_id = finished
    found = details(conn, run_id)
    assert found["run"]["id"] == str(run_id) and found["run"]["status"] == "partial"
    assert len(found["jobs"]) == 3
    assert all("contact_ids" not in j for j in found["jobs"])
    assert sorted(j["contact_count"] for j in found["jobs"]) == [1, 2, 2]
    assert found["job_counts"] == {"completed": 3}
    assert found["item_counts"] == {"sent": 3, "failed": 1, "unknown": 1}
    assert len(found["items"]) == 5 and found["item_limit"] == 1000
    assert {i["contact_id"] for i in found["items"]} == {str(c) for c in seed.contact_ids}
    assert found["lineage"] == [
        {"id": str(run_id), "generation": 1, "status": "partial", "retry_of_run_id": None,
         "created_at": found["lineage"][0]["created_at"]},
    ]
    assert {(e["entity"], e["to_status"]) for e in found["events"]} >= {
        ("run", "queued"), ("run", "running"), ("run", "partial"), ("job", "processing"), ("job", "completed"),
    }


def test_run_details_limits_items_and_shows_the_lineage(conn, finished):
    _seed, run_id = finished
    new = retry(conn, run_id)
    assert [r["id"] for r in details(conn, new)["lineage"]] == [str(run_id), str(new)]
    limited = details(conn, run_id, 2)
    assert len(limited["items"]) == 2 and limited["item_limit"] == 2
    assert sum(limited["item_counts"].values()) == 5  # counts are not limited
    assert details(conn, run_id, 0)["items"] == []


def test_run_details_of_a_fresh_run(conn):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id)
    found = details(conn, run_id)
    assert found["job_counts"] == {"queued": 1}
    assert (found["item_counts"], found["items"]) == ({}, [])

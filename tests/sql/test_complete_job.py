"""complete_job: only with every item terminal (KE006) and, for success, every contact itemised
(KE007); fencing of both forms; the run's status derived from its jobs and items."""

from __future__ import annotations

import pytest

from tests.sql.helpers import (
    claim,
    complete,
    deploy,
    deploy_and_claim,
    dispatch,
    job_row,
    record,
    refused,
    reserve,
    result,
    run_job,
    run_row,
    seed_campaign,
    send_items,
    set_setting,
)


def test_refused_while_an_item_is_pending(conn):
    _, _run_id, job = deploy_and_claim(conn, 3)
    items = reserve(conn, job["id"])
    dispatch(conn, job["id"], "w1", [i["id"] for i in items])
    record(conn, job["id"], "w1", [result(i["id"], "sent") for i in items[:2]])
    for success in (True, False):
        with refused(conn, "KE006", job["id"]):
            complete(conn, job["id"], "w1", success)
    assert job_row(conn, job["id"])["status"] == "processing"


def test_success_refused_while_a_contact_has_no_item(conn):
    _, _, job = deploy_and_claim(conn, 3)
    batch = reserve(conn, job["id"], "w1", 1)
    dispatch(conn, job["id"], "w1", [batch[0]["id"]])
    record(conn, job["id"], "w1", [result(batch[0]["id"], "sent")])
    with refused(conn, "KE007", job["id"]):
        complete(conn, job["id"], "w1", True)


def test_failure_allowed_once_items_are_terminal(conn):
    _, run_id, job = deploy_and_claim(conn, 3)
    batch = reserve(conn, job["id"], "w1", 1)
    record(conn, job["id"], "w1", [result(batch[0]["id"], "failed", error="bounced")])
    complete(conn, job["id"], "w1", False, "provider rejected the batch")
    done = job_row(conn, job["id"])
    assert (done["status"], done["last_error"], done["locked_by"], done["lease_expires_at"]) == (
        "failed", "provider rejected the batch", None, None,
    )
    assert done["completed_at"] is not None
    assert run_row(conn, run_id)["status"] == "failed"


def test_a_job_whose_contacts_were_all_skipped_completes(conn):
    _, run_id, job = deploy_and_claim(conn, 2)
    conn.execute("UPDATE contacts SET unsubscribed = true")
    assert reserve(conn, job["id"]) == []
    complete(conn, job["id"], "w1", True)
    assert run_row(conn, run_id)["status"] == "completed"


def test_seed_form_completes_without_a_worker_setting(conn):
    _, run_id, job = deploy_and_claim(conn, 2)
    send_items(conn, job["id"], "w1")
    complete(conn, job["id"], None, True)  # complete_job(uuid, boolean, text)
    assert job_row(conn, job["id"])["status"] == "completed"
    assert run_row(conn, run_id)["status"] == "completed"


def test_seed_form_is_fenced_by_the_worker_id_setting(conn):
    _, _run_id, job = deploy_and_claim(conn, 2, "w1")
    send_items(conn, job["id"], "w1")
    set_setting(conn, "execution_kernel.worker_id", "w2")
    with refused(conn, "KE005", job["id"], "w2"):
        complete(conn, job["id"], None, True)
    set_setting(conn, "execution_kernel.worker_id", "w1")
    complete(conn, job["id"], None, True)
    assert job_row(conn, job["id"])["status"] == "completed"


def test_operator_completion_refuses_a_job_that_is_not_processing(conn):
    seed = seed_campaign(conn, 1)
    deploy(conn, seed.campaign_id)
    (job,) = conn.execute("SELECT id FROM job_queue").fetchall()
    with refused(conn, "KE004", job[0]):
        complete(conn, job[0], None, False)


# --- the run's status ---------------------------------------------------------------------


def run_jobs(conn, contacts, batch, plan):
    """Deploy a campaign in batches and run job i with ``plan[i]`` = (item outcome, success)."""
    seed = seed_campaign(conn, contacts)
    run_id = deploy(conn, seed.campaign_id, batch)
    jobs = claim(conn, "w1", len(plan))
    assert len(jobs) == len(plan)
    for job, (outcome, success) in zip(jobs, plan, strict=True):
        if success:
            run_job(conn, job["id"], "w1", outcome)
        else:
            complete(conn, job["id"], "w1", False, "gave up")
    return run_id


def test_run_completes_when_every_job_completed_with_every_item_sent(conn):
    run_id = run_jobs(conn, 4, 2, [("sent", True), ("sent", True)])
    run = run_row(conn, run_id)
    assert (run["status"], run["error_message"]) == ("completed", None)
    assert run["completed_at"] is not None


def test_run_stays_running_until_its_last_job_ends(conn):
    seed = seed_campaign(conn, 4)
    run_id = deploy(conn, seed.campaign_id, 2)
    first, second = claim(conn, "w1", 2)
    run_job(conn, first["id"], "w1")
    assert run_row(conn, run_id)["status"] == "running"
    run_job(conn, second["id"], "w1")
    assert run_row(conn, run_id)["status"] == "completed"


def test_run_fails_when_every_job_failed(conn):
    run_id = run_jobs(conn, 4, 2, [(None, False), (None, False)])
    run = run_row(conn, run_id)
    assert run["status"] == "failed"
    assert "2 of 2 jobs failed" in run["error_message"]


def test_run_is_partial_when_jobs_are_mixed(conn):
    run_id = run_jobs(conn, 4, 2, [("sent", True), (None, False)])
    run = run_row(conn, run_id)
    assert run["status"] == "partial"
    assert "1 of 2 jobs failed" in run["error_message"]


def test_run_is_partial_when_completed_jobs_have_failed_items(conn):
    def outcome(item):
        return "failed" if item["contact_id"] == first_contact else "sent"

    seed = seed_campaign(conn, 3)
    first_contact = seed.contact_ids[0]
    run_id = deploy(conn, seed.campaign_id)
    (job,) = claim(conn, "w1", 1)
    run_job(conn, job["id"], "w1", outcome)
    run = run_row(conn, run_id)
    assert run["status"] == "partial"
    assert "1 items failed or unknown, 2 sent" in run["error_message"]


@pytest.mark.parametrize("outcome", ["failed", "unknown"])
def test_run_fails_when_completed_jobs_sent_nothing(conn, outcome):
    run_id = run_jobs(conn, 2, 1, [(outcome, True), (outcome, True)])
    assert run_row(conn, run_id)["status"] == "failed"


def test_unknown_items_make_a_run_partial(conn):
    run_id = run_jobs(conn, 2, 1, [("sent", True), ("unknown", True)])
    assert run_row(conn, run_id)["status"] == "partial"


def test_processing_job_of_a_cancelled_run_ends_cancelled(conn):
    _, run_id, job = deploy_and_claim(conn, 3)
    items = reserve(conn, job["id"], "w1", 2)
    dispatch(conn, job["id"], "w1", [items[0]["id"]])
    conn.execute("SELECT cancel_campaign_run(%s)", [run_id])
    record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
    complete(conn, job["id"], "w1", True)  # no KE007: the rest of the share is cancelled
    assert job_row(conn, job["id"])["status"] == "cancelled"
    run = run_row(conn, run_id)
    assert run["status"] == "cancelled"
    assert run["completed_at"] is not None

"""The outbox around each provider call: reserve, mark dispatched, record results, recover."""

from __future__ import annotations

import uuid

import pytest

from tests.sql.helpers import (
    claim_one,
    deploy,
    deploy_and_claim,
    dispatch,
    in_threads,
    item_row,
    items_of,
    jobs_of,
    record,
    refused,
    reserve,
    result,
    rows,
    scalar,
    seed_campaign,
)


def test_reserve_inserts_pending_items_with_the_deterministic_key(conn):
    seed, run_id, job = deploy_and_claim(conn, 3)
    items = reserve(conn, job["id"])
    assert sorted(i["contact_id"] for i in items) == seed.contact_ids
    for item in items:
        assert item["idempotency_key"] == f"{run_id}:email:{item['contact_id']}:1"
        assert (item["status"], item["skipped"], item["dispatched_at"], item["dispatch_count"]) == (
            "pending", False, None, 0,
        )
        assert (item["run_id"], item["job_id"], item["root_run_id"], item["generation"]) == (
            run_id, job["id"], run_id, 1,
        )
        assert (item["tenant_id"], item["workspace_id"]) == (seed.tenant_id, seed.workspace_id)
        assert (item["channel"], item["provider"]) == ("email", "smtp")
        assert item["recipient"].endswith("@example.com")
    assert scalar(conn, "SELECT reserved_count FROM job_queue") == 3


def test_voice_items_carry_the_phone_number(conn):
    _, run_id, job = deploy_and_claim(conn, 1, channel="voice")
    (item,) = reserve(conn, job["id"])
    assert item["recipient"].startswith("+1555")
    assert item["idempotency_key"] == f"{run_id}:voice:{item['contact_id']}:1"
    assert item["provider"] == "twilio"


def test_reserve_walks_the_snapshot_in_batches(conn):
    seed, _, job = deploy_and_claim(conn, 5)
    first = reserve(conn, job["id"], "w1", 2)
    assert len(first) == 2
    # Not dispatched yet: the same two come back, nothing new is inserted.
    assert [i["id"] for i in reserve(conn, job["id"], "w1", 2)] == [i["id"] for i in first]
    assert scalar(conn, "SELECT count(*) FROM channel_outbox") == 2
    dispatch(conn, job["id"], "w1", [i["id"] for i in first])
    second = reserve(conn, job["id"], "w1", 2)
    dispatch(conn, job["id"], "w1", [i["id"] for i in second])
    third = reserve(conn, job["id"], "w1", 2)
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert sorted(i["contact_id"] for i in first + second + third) == seed.contact_ids
    dispatch(conn, job["id"], "w1", [third[0]["id"]])
    assert reserve(conn, job["id"], "w1", 2) == []


def test_two_sessions_reserving_the_same_job_at_once_make_one_row_per_contact(conn, connect):
    _seed, _, job = deploy_and_claim(conn, 200)
    sessions = [connect(), connect()]
    outcomes = in_threads(2, lambda i: reserve(sessions[i], job["id"], "w1", 150))
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    assert scalar(conn, "SELECT count(*) FROM channel_outbox") == 150
    assert scalar(conn, "SELECT count(DISTINCT contact_id) FROM channel_outbox") == 150
    # Whoever went second saw the first one's rows: both got the same batch.
    assert {i["id"] for i in outcomes[0]} == {i["id"] for i in outcomes[1]}
    reserved = dispatch(conn, job["id"], "w1", [i["id"] for i in outcomes[0]])
    assert reserved == 150
    assert len(reserve(conn, job["id"], "w1", 150)) == 50
    assert scalar(conn, "SELECT count(DISTINCT idempotency_key) FROM channel_outbox") == 200


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("UPDATE contacts SET unsubscribed = true WHERE id = %s", "unsubscribed"),
        ("UPDATE contacts SET email = NULL WHERE id = %s", "no_address"),
        ("UPDATE contacts SET email = '  ' WHERE id = %s", "no_address"),
        ("DELETE FROM contacts WHERE id = %s", "contact_deleted"),
    ],
    ids=["unsubscribed", "no-email", "blank-email", "deleted"],
)
def test_unreachable_contacts_become_skipped_items(conn, setup, reason):
    seed, run_id, job = deploy_and_claim(conn, 3)
    gone = seed.contact_ids[0]
    conn.execute(setup, [gone])  # after deploy: the snapshot still holds the contact
    items = reserve(conn, job["id"])
    assert sorted(i["contact_id"] for i in items) == seed.contact_ids[1:]
    (skipped,) = [i for i in items_of(conn, "run_id", run_id) if i["contact_id"] == gone]
    assert (skipped["status"], skipped["skipped"], skipped["skip_reason"]) == ("skipped", True, reason)
    assert skipped["idempotency_key"] == f"{run_id}:email:{gone}:1"


def test_skipped_contacts_do_not_fill_the_batch(conn):
    seed, _, job = deploy_and_claim(conn, 6)
    first_two = seed.contact_ids[:2]  # the snapshot is in contact id order
    conn.execute("UPDATE contacts SET unsubscribed = true WHERE id = ANY (%s)", [first_two])
    items = reserve(conn, job["id"], "w1", 3)
    assert sorted(i["contact_id"] for i in items) == seed.contact_ids[2:5]
    assert scalar(conn, "SELECT count(*) FILTER (WHERE status = 'skipped') FROM channel_outbox") == 2
    assert scalar(conn, "SELECT reserved_count FROM job_queue") == 5


def test_reserve_of_a_cancelled_run_returns_and_inserts_nothing(conn):
    _, run_id, job = deploy_and_claim(conn, 3)
    conn.execute("SELECT cancel_campaign_run(%s)", [run_id])
    assert reserve(conn, job["id"]) == []
    assert scalar(conn, "SELECT count(*) FROM channel_outbox") == 0


# --- mark_outbox_dispatched ----------------------------------------------------------------


@pytest.fixture
def reserved(conn):
    """A claimed job of a 4-contact run, its items reserved."""
    _seed, _run_id, job = deploy_and_claim(conn, 4)
    return job["id"], reserve(conn, job["id"])


def test_mark_dispatched_stamps_the_items(conn, reserved):
    job_id, items = reserved
    assert dispatch(conn, job_id, "w1", [items[0]["id"], items[1]["id"]]) == 2
    marked = item_row(conn, items[0]["id"])
    assert marked["dispatched_at"] is not None and marked["dispatch_count"] == 1
    assert marked["status"] == "pending"
    assert item_row(conn, items[2]["id"])["dispatched_at"] is None


def other_job_item(conn):
    """A pending item of another job (another campaign's run)."""
    seed = seed_campaign(conn, 1)
    deploy(conn, seed.campaign_id)
    job = claim_one(conn, "w1")
    return reserve(conn, job["id"])[0]["id"]


@pytest.mark.parametrize("bad", ["already-dispatched", "terminal", "other-job", "missing", "duplicate"])
def test_mark_dispatched_refuses_items_it_cannot_mark_and_writes_nothing(conn, reserved, bad):
    job_id, items = reserved
    good, victim = items[0]["id"], items[1]["id"]
    if bad == "already-dispatched":
        dispatch(conn, job_id, "w1", [victim])
    elif bad == "terminal":
        record(conn, job_id, "w1", [result(victim, "failed")])
    elif bad == "other-job":
        victim = other_job_item(conn)
    elif bad == "missing":
        victim = uuid.uuid4()
    elif bad == "duplicate":
        victim = good
    with refused(conn, "KE008", job_id):
        dispatch(conn, job_id, "w1", [good, victim])
    assert item_row(conn, good)["dispatched_at"] is None


# --- record_outbox_results -----------------------------------------------------------------


def test_record_sent_failed_unknown(conn, reserved):
    job_id, items = reserved
    ids = [i["id"] for i in items]
    dispatch(conn, job_id, "w1", ids[:3])
    n = record(conn, job_id, "w1", [
        result(ids[0], "sent", provider_message_id="pm-1", provider_response={"code": 250}),
        result(ids[1], "failed", error="550 mailbox unavailable"),
        result(ids[2], "unknown", error="timeout after send"),
        result(ids[3], "failed", error="rejected before dispatch"),  # failed needs no dispatch
    ])
    assert n == 4
    sent, failed, unknown, undispatched = (item_row(conn, i) for i in ids)
    assert (sent["status"], sent["provider_message_id"], sent["provider_response"]) == ("sent", "pm-1", {"code": 250})
    assert sent["sent_at"] is not None and sent["completed_at"] is not None
    assert (failed["status"], failed["error"], failed["sent_at"]) == ("failed", "550 mailbox unavailable", None)
    assert (unknown["status"], unknown["error"]) == ("unknown", "timeout after send")
    assert undispatched["status"] == "failed"


MALFORMED_RESULTS = {
    "not-an-array": '{"id": "x"}',
    "json-null": "null",
    "element-not-an-object": "[1]",
    "missing-id": '[{"outcome": "sent", "provider_message_id": "p"}]',
    "bad-uuid": '[{"id": "not-a-uuid", "outcome": "failed"}]',
    "bad-outcome": '[{"id": "{good}", "outcome": "delivered"}]',
    "missing-outcome": '[{"id": "{good}"}]',
    "sent-without-provider-id": '[{"id": "{good}", "outcome": "sent"}]',
    "sent-with-empty-provider-id": '[{"id": "{good}", "outcome": "sent", "provider_message_id": ""}]',
    "item-of-another-job": '[{"id": "{good}", "outcome": "failed"}, {"id": "{other}", "outcome": "failed"}]',
    "same-item-twice": '[{"id": "{good}", "outcome": "failed"},'
    ' {"id": "{good}", "outcome": "sent", "provider_message_id": "p"}]',
}


def test_malformed_results_are_refused_and_nothing_is_written(conn, reserved):
    job_id, items = reserved
    good = items[0]["id"]
    dispatch(conn, job_id, "w1", [good])
    other = other_job_item(conn)
    for case, payload in MALFORMED_RESULTS.items():
        text = payload.replace("{good}", str(good)).replace("{other}", str(other))
        with refused(conn, "KE008", case=case):
            record(conn, job_id, "w1", text)


def test_outcomes_that_imply_a_call_need_a_dispatched_item(conn, reserved):
    job_id, items = reserved
    for outcome in ["sent", "unknown", "retry"]:
        with refused(conn, "KE008", job_id, case=outcome):
            record(conn, job_id, "w1", [result(items[0]["id"], outcome)])


def test_a_terminal_item_cannot_be_recorded_again(conn, reserved):
    job_id, items = reserved
    dispatch(conn, job_id, "w1", [items[0]["id"]])
    record(conn, job_id, "w1", [result(items[0]["id"], "sent")])
    with refused(conn, "KE008"):
        record(conn, job_id, "w1", [result(items[0]["id"], "failed")])


def test_retry_puts_the_item_back_undispatched_with_the_same_key(conn, reserved):
    job_id, items = reserved
    item = items[0]
    dispatch(conn, job_id, "w1", [item["id"]])
    record(conn, job_id, "w1", [result(item["id"], "retry", error="421 try later")])
    back = item_row(conn, item["id"])
    assert (back["status"], back["dispatched_at"], back["dispatch_count"]) == ("pending", None, 1)
    assert back["idempotency_key"] == item["idempotency_key"]
    assert item["id"] in [i["id"] for i in reserve(conn, job_id)]


def test_retry_after_five_dispatches_ends_failed(conn, reserved):
    job_id, items = reserved
    item = items[0]["id"]
    for attempt in range(1, 6):
        dispatch(conn, job_id, "w1", [item])
        record(conn, job_id, "w1", [result(item, "retry", error=f"busy {attempt}")])
        expected = "pending" if attempt < 5 else "failed"
        assert item_row(conn, item)["status"] == expected, attempt
    final = item_row(conn, item)
    assert final["dispatch_count"] == 5
    assert "gave up after 5 dispatches" in final["error"] and "busy 5" in final["error"]
    assert scalar(conn, "SELECT count(*) FROM channel_outbox WHERE contact_id = %s", [items[0]["contact_id"]]) == 1


# --- recover_dispatched_items --------------------------------------------------------------


@pytest.fixture
def crashed(conn):
    """w1 dispatched two of three items and vanished; w2 re-claimed the job."""
    _seed, _run_id, job = deploy_and_claim(conn, 3, "w1")
    items = reserve(conn, job["id"], "w1")
    dispatch(conn, job["id"], "w1", [items[0]["id"], items[1]["id"]])
    record(conn, job["id"], "w1", [result(items[0]["id"], "sent")])
    conn.execute("UPDATE job_queue SET lease_expires_at = now() - interval '1 second'")
    assert claim_one(conn, "w2")["id"] == job["id"]
    return job["id"], items


def test_recover_without_deduplication_makes_in_flight_items_unknown(conn, crashed):
    job_id, items = crashed
    assert scalar(conn, "SELECT recover_dispatched_items(%s, 'w2', false)", [job_id]) == 1
    assert [item_row(conn, i["id"])["status"] for i in items] == ["sent", "unknown", "pending"]
    assert "not re-sent" in item_row(conn, items[1]["id"])["error"]
    assert [i["id"] for i in reserve(conn, job_id, "w2")] == [items[2]["id"]]


def test_recover_with_deduplication_sends_again_under_the_same_key(conn, crashed):
    job_id, items = crashed
    assert scalar(conn, "SELECT recover_dispatched_items(%s, 'w2', true)", [job_id]) == 1
    again = reserve(conn, job_id, "w2")
    assert {i["id"] for i in again} == {items[1]["id"], items[2]["id"]}
    assert {i["idempotency_key"] for i in again} == {items[1]["idempotency_key"], items[2]["idempotency_key"]}
    dispatch(conn, job_id, "w2", [items[1]["id"]])
    assert item_row(conn, items[1]["id"])["dispatch_count"] == 2


def test_outbox_rows_are_never_duplicated_across_a_whole_run(conn):
    seed = seed_campaign(conn, 30, unsubscribed_every=7)
    run_id = deploy(conn, seed.campaign_id, 10)
    for _ in jobs_of(conn, run_id):
        job = claim_one(conn, "w1")
        for batch_size in (4, 4, 1000):
            batch = reserve(conn, job["id"], "w1", batch_size)
            dispatch(conn, job["id"], "w1", [i["id"] for i in batch])
            record(conn, job["id"], "w1", [result(i["id"], "sent") for i in batch])
        conn.execute("SELECT complete_job(%s, true, NULL, 'w1')", [job["id"]])
    counts = rows(conn, "SELECT count(*) AS n, count(DISTINCT contact_id) AS contacts,"
                  " count(DISTINCT idempotency_key) AS keys FROM channel_outbox")[0]
    assert counts == {"n": 30, "contacts": 30, "keys": 30}
    assert scalar(conn, "SELECT status FROM campaign_runs") == "completed"

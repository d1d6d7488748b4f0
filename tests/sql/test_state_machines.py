"""The guard triggers: only the contract's moves are legal (KE004); terminal items never change
(KE012). Moves are made by direct UPDATEs as superuser, so nothing but the triggers stands in
the way."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from kernel_driver.queries import TERMINAL_RUN_STATUSES
from tests.sql.helpers import (
    deploy,
    deploy_and_claim,
    dispatch,
    jobs_of,
    raises,
    record,
    reserve,
    result,
    rows,
    scalar,
    seed_campaign,
    triggers_off,
)

RUN_STATUSES = ["queued", "running", "completed", "partial", "failed", "cancelled"]
RUN_LEGAL = {
    ("queued", "running"), ("running", "completed"), ("running", "partial"), ("running", "failed"),
    ("queued", "completed"), ("queued", "partial"), ("queued", "failed"),
    ("queued", "cancelled"), ("running", "cancelled"),
}
JOB_STATUSES = ["scheduled", "queued", "processing", "completed", "failed", "cancelled"]
JOB_LEGAL = {
    ("queued", "processing"), ("processing", "completed"), ("processing", "failed"),
    ("processing", "queued"), ("queued", "failed"), ("queued", "cancelled"),
    ("processing", "cancelled"),
    # 1.4: scheduled until a start or a send window; a job outside its window pauses.
    ("scheduled", "queued"), ("scheduled", "cancelled"), ("processing", "scheduled"),
}
TERMINAL_ITEM = ["sent", "failed", "unknown", "skipped"]

RUN_ILLEGAL = [p for p in itertools.permutations(RUN_STATUSES, 2) if p not in RUN_LEGAL]
JOB_ILLEGAL = [p for p in itertools.permutations(JOB_STATUSES, 2) if p not in JOB_LEGAL]


def job_state(status, worker="w1"):
    """SET clause values that satisfy job_queue's lease constraint for ``status``."""
    held = status == "processing"
    return {
        "status": status,
        "locked_by": worker if held else None,
        "lease_expires_at_sql": "now() + interval '1 hour'" if held else "NULL",
    }


def set_job(conn, job_id, status, worker="w1"):
    state = job_state(status, worker)
    conn.execute(
        f"UPDATE job_queue SET status = %s, locked_by = %s,"
        f" lease_expires_at = {state['lease_expires_at_sql']} WHERE id = %s",
        [state["status"], state["locked_by"], job_id],
    )


@pytest.fixture
def run_and_job(conn):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id)
    return run_id, jobs_of(conn, run_id)[0]["id"]


def set_run(conn, run_id, status):
    conn.execute("UPDATE campaign_runs SET status = %s WHERE id = %s", [status, run_id])


def try_moves(conn, entity_id, pairs, setter, table):
    """Put the row into ``old`` (guards off), then move it to ``new`` through the guard.
    Returns, per pair, the SQLSTATE of the refusal (None when allowed), and checks that a
    refused move left the status alone."""
    outcomes = {}
    for old, new in pairs:
        with triggers_off(conn):
            setter(conn, entity_id, old)
        try:
            setter(conn, entity_id, new)
            outcomes[old, new] = None
        except psycopg.Error as exc:
            outcomes[old, new] = exc.diag.sqlstate
            assert entity_id_in(exc, entity_id), f"{old}->{new}: message lacks the id: {exc}"
            assert scalar(conn, f"SELECT status FROM {table} WHERE id = %s", [entity_id]) == old
    return outcomes


def entity_id_in(exc, entity_id):
    return str(entity_id) in (exc.diag.message_primary or "")


def test_the_driver_s_terminal_run_statuses_are_the_kernel_s(conn):
    terminal = rows(
        conn,
        "SELECT DISTINCT to_status AS status FROM state_transitions WHERE entity = 'run'"
        " AND to_status NOT IN (SELECT from_status FROM state_transitions WHERE entity = 'run')",
    )
    assert {r["status"] for r in terminal} == TERMINAL_RUN_STATUSES
    assert set(RUN_STATUSES) - TERMINAL_RUN_STATUSES == {"queued", "running"}


def test_every_illegal_run_transition_is_refused(conn, run_and_job):
    run_id, _ = run_and_job
    outcomes = try_moves(conn, run_id, RUN_ILLEGAL, set_run, "campaign_runs")
    assert {pair: state for pair, state in outcomes.items() if state != "KE004"} == {}


def test_every_legal_run_transition_is_allowed_and_audited(conn, run_and_job):
    run_id, _ = run_and_job
    for old, new in sorted(RUN_LEGAL):
        assert try_moves(conn, run_id, [(old, new)], set_run, "campaign_runs") == {(old, new): None}
        last = rows(
            conn,
            "SELECT from_status, to_status FROM job_events WHERE run_id = %s AND entity = 'run'"
            " ORDER BY id DESC LIMIT 1",
            [run_id],
        )
        assert last == [{"from_status": old, "to_status": new}]


def test_run_must_be_inserted_queued(conn):
    seed = seed_campaign(conn, 1)
    for status in RUN_STATUSES[1:]:
        with raises("KE004", case=status):
            conn.execute(
                "INSERT INTO campaign_runs (id, campaign_id, tenant_id, workspace_id, status, channel,"
                " root_run_id) SELECT r, %s, %s, %s, %s, 'email', r FROM gen_random_uuid() AS r",
                [seed.campaign_id, seed.tenant_id, seed.workspace_id, status],
            )


def test_every_illegal_job_transition_is_refused(conn, run_and_job):
    _, job_id = run_and_job
    outcomes = try_moves(conn, job_id, JOB_ILLEGAL, set_job, "job_queue")
    assert {pair: state for pair, state in outcomes.items() if state != "KE004"} == {}


def test_every_legal_job_transition_is_allowed_and_audited(conn, run_and_job):
    _, job_id = run_and_job
    for old, new in sorted(JOB_LEGAL):
        assert try_moves(conn, job_id, [(old, new)], set_job, "job_queue") == {(old, new): None}
        last = rows(
            conn,
            "SELECT from_status, to_status, worker FROM job_events WHERE job_id = %s"
            " ORDER BY id DESC LIMIT 1",
            [job_id],
        )
        worker = "w1" if "processing" in (old, new) else None
        assert last == [{"from_status": old, "to_status": new, "worker": worker}]


def test_reclaim_processing_to_processing_is_legal_and_audited(conn, run_and_job):
    _, job_id = run_and_job
    with triggers_off(conn):
        set_job(conn, job_id, "processing", "w1")
    conn.execute(
        "UPDATE job_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id]
    )
    set_job(conn, job_id, "processing", "w2")
    events = rows(conn, "SELECT from_status, to_status, worker FROM job_events WHERE job_id = %s", [job_id])
    assert events == [{"from_status": "processing", "to_status": "processing", "worker": "w2"}]


def test_taking_over_a_live_lease_is_refused(conn, run_and_job):
    _, job_id = run_and_job
    with triggers_off(conn):
        set_job(conn, job_id, "processing", "w1")  # lease valid for an hour
    with raises("KE004", job_id):
        set_job(conn, job_id, "processing", "w2")


def test_one_illegal_move_refuses_the_whole_statement_and_records_nothing(conn):
    seed = seed_campaign(conn, 4)
    run_id = deploy(conn, seed.campaign_id, batch_size=1)
    jobs = sorted(job["id"] for job in jobs_of(conn, run_id))
    with triggers_off(conn):
        set_job(conn, jobs[-1], "completed")  # the last in id order cannot go to processing
    events = scalar(conn, "SELECT count(*) FROM job_events")
    with raises("KE004", jobs[-1]):
        conn.execute(
            "UPDATE job_queue SET status = 'processing', locked_by = 'w1', attempts = attempts + 1,"
            " lease_expires_at = now() + interval '1 hour' WHERE run_id = %s",
            [run_id],
        )
    assert [r["status"] for r in rows(conn, "SELECT status FROM job_queue ORDER BY id")] == [
        "queued", "queued", "queued", "completed"]
    assert scalar(conn, "SELECT count(*) FROM job_events") == events


def test_a_statement_records_one_event_per_move_and_none_for_a_renewal(conn):
    seed = seed_campaign(conn, 3)
    run_id = deploy(conn, seed.campaign_id, batch_size=1)
    conn.execute(
        "UPDATE job_queue SET status = 'processing', locked_by = 'w1', attempts = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE run_id = %s",
        [run_id],
    )
    conn.execute("UPDATE job_queue SET lease_expires_at = now() + interval '2 hours' WHERE run_id = %s", [run_id])
    conn.execute("UPDATE campaign_runs SET status = 'running' WHERE id = %s", [run_id])
    conn.execute("UPDATE campaign_runs SET error_message = 'just a note' WHERE id = %s", [run_id])
    events = rows(
        conn,
        "SELECT entity, job_id, from_status, to_status, worker FROM job_events WHERE run_id = %s ORDER BY id",
        [run_id],
    )
    jobs = sorted(job["id"] for job in jobs_of(conn, run_id))
    assert events == [
        {"entity": "run", "job_id": None, "from_status": None, "to_status": "queued", "worker": None},
        *({"entity": "job", "job_id": job, "from_status": "queued", "to_status": "processing", "worker": "w1"}
          for job in jobs),
        {"entity": "run", "job_id": None, "from_status": "queued", "to_status": "running", "worker": None},
    ]


def test_job_must_be_inserted_queued(conn, run_and_job):
    _run_id, job_id = run_and_job
    with raises("KE004"):
        conn.execute(
            "INSERT INTO job_queue (run_id, tenant_id, workspace_id, status, locked_by, lease_expires_at)"
            " SELECT run_id, tenant_id, workspace_id, 'processing', 'w1', now() + interval '1 hour'"
            " FROM job_queue WHERE id = %s",
            [job_id],
        )


# --- outbox items -------------------------------------------------------------------------


@pytest.fixture
def reserved(conn):
    """A claimed job with its three items reserved (pending, undispatched)."""
    _seed, run_id, job = deploy_and_claim(conn, 3)
    items = reserve(conn, job["id"])
    assert [i["status"] for i in items] == ["pending"] * 3
    return run_id, job["id"], items


def make_terminal(conn, job_id, item, status):
    if status == "skipped":
        with triggers_off(conn):  # a cancel would do it; keep the rest of the run untouched
            conn.execute(
                "UPDATE channel_outbox SET status = 'skipped', skipped = true, skip_reason = 'run_cancelled',"
                " completed_at = now() WHERE id = %s",
                [item],
            )
        return
    if status != "failed":
        dispatch(conn, job_id, "w1", [item])
    record(conn, job_id, "w1", [result(item, status)])


TERMINAL_UPDATES = {  # including updates that look like no-ops
    "back-to-pending": "status = 'pending', skipped = false, skip_reason = NULL",
    "same-status": "status = status",
    "error-text": "error = 'rewritten'",
    "provider-id": "provider_message_id = 'other'",
    "no-op": "id = id",
}


@pytest.mark.parametrize("status", TERMINAL_ITEM)
def test_terminal_item_never_changes(conn, reserved, status):
    _, job_id, items = reserved
    item = items[0]["id"]
    make_terminal(conn, job_id, item, status)
    before = rows(conn, "SELECT * FROM channel_outbox WHERE id = %s", [item])
    for change in TERMINAL_UPDATES.values():
        with raises("KE012", item):
            conn.execute(f"UPDATE channel_outbox SET {change} WHERE id = %s", [item])
    assert rows(conn, "SELECT * FROM channel_outbox WHERE id = %s", [item]) == before


def test_item_cannot_be_inserted_terminal(conn, reserved):
    _, _, items = reserved
    for status in ["sent", "failed", "unknown"]:
        with raises("KE004", case=status):
            conn.execute(
                "INSERT INTO channel_outbox (run_id, job_id, tenant_id, workspace_id, channel, provider,"
                " status, idempotency_key, provider_message_id, contact_id, root_run_id, generation,"
                " dispatched_at)"
                " SELECT run_id, job_id, tenant_id, workspace_id, channel, provider, %s, 'fresh-key',"
                " 'p-1', contact_id, root_run_id, generation, now() FROM channel_outbox WHERE id = %s",
                [status, items[0]["id"]],
            )


def skip(conn, item):
    conn.execute(
        "UPDATE channel_outbox SET status = 'skipped', skipped = true, skip_reason = 'run_cancelled'"
        " WHERE id = %s",
        [item],
    )


def test_pending_to_skipped_refused_while_run_is_active(conn, reserved):
    _, _, items = reserved
    with raises("KE004", items[0]["id"]):
        skip(conn, items[0]["id"])


def test_pending_to_skipped_refused_once_dispatched_even_if_cancelled(conn, reserved):
    run_id, job_id, items = reserved
    dispatch(conn, job_id, "w1", [items[0]["id"]])
    conn.execute("UPDATE campaign_runs SET status = 'cancelled' WHERE id = %s", [run_id])
    with raises("KE004", items[0]["id"]):
        skip(conn, items[0]["id"])


def test_pending_to_skipped_allowed_when_undispatched_and_cancelled(conn, reserved):
    run_id, _, items = reserved
    conn.execute("UPDATE campaign_runs SET status = 'cancelled' WHERE id = %s", [run_id])
    skip(conn, items[0]["id"])
    assert scalar(conn, "SELECT status FROM channel_outbox WHERE id = %s", [items[0]["id"]]) == "skipped"


def test_pending_item_may_change_without_a_status_move(conn, reserved):
    _, job_id, items = reserved
    dispatch(conn, job_id, "w1", [items[0]["id"]])
    conn.execute("UPDATE channel_outbox SET error = 'still trying' WHERE id = %s", [items[0]["id"]])
    assert scalar(conn, "SELECT status FROM channel_outbox WHERE id = %s", [items[0]["id"]]) == "pending"


def test_item_terminal_move_stamps_completed_at(conn, reserved):
    _, job_id, items = reserved
    make_terminal(conn, job_id, items[0]["id"], "failed")
    assert scalar(conn, "SELECT completed_at IS NOT NULL FROM channel_outbox WHERE id = %s", [items[0]["id"]])


def test_transition_table_matches_the_contract(conn):
    found = {
        (r["entity"], r["from_status"], r["to_status"])
        for r in rows(conn, "SELECT * FROM state_transitions")
    }
    expected = (
        {("run", a, b) for a, b in RUN_LEGAL}
        | {("job", a, b) for a, b in JOB_LEGAL | {("processing", "processing")}}
        | {("item", "pending", s) for s in TERMINAL_ITEM}
    )
    assert found == expected

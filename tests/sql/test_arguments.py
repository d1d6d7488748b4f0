"""Every public function answers a NULL argument with KE008 and an id it does not know with
KE002, naming what is wrong; none of them silently does nothing, and none writes anything."""

from __future__ import annotations

import uuid

import pytest

from tests.sql.helpers import (
    deploy_and_claim,
    refused,
    reserve,
)

MISSING = uuid.UUID("00000000-0000-4000-8000-000000000001")

# function → [(SQL, arguments, SQLSTATE, what the message must mention)]; arguments name the
# context's values: job, item_ids, run, campaign, workspace, or are literal.
CASES = {
    "deploy_campaign(uuid)": [
        ("SELECT deploy_campaign(%s::uuid)", [None], "KE008", "campaign_id"),
        ("SELECT deploy_campaign(%s::uuid)", [MISSING], "KE002", MISSING),
    ],
    "deploy_campaign(uuid, integer)": [
        ("SELECT deploy_campaign(%s::uuid, 10)", [None], "KE008", "campaign_id"),
        ("SELECT deploy_campaign(%s::uuid, 10)", [MISSING], "KE002", MISSING),
        ("SELECT deploy_campaign(%s, NULL::int)", ["campaign"], "KE008", "batch_size"),
        ("SELECT deploy_campaign(%s, 0)", ["campaign"], "KE008", "batch_size"),
        ("SELECT deploy_campaign(%s, -1)", ["campaign"], "KE008", "batch_size"),
        ("SELECT deploy_campaign(%s, 100001)", ["campaign"], "KE008", "batch_size"),
    ],
    "undispatch_items": [
        ("SELECT * FROM undispatch_items(NULL, '{}'::uuid[], '{}'::uuid[])", [], "KE008", "worker"),
        ("SELECT * FROM undispatch_items('w1', NULL, '{}'::uuid[])", [], "KE008", "job_ids"),
        ("SELECT * FROM undispatch_items('w1', '{}'::uuid[], NULL)", [], "KE008", "known_item_ids"),
    ],
    "send_window_opens": [
        ("""SELECT send_window_opens('{"start": false, "end": "21:00"}', 'UTC', now())""", [], "KE008", "start"),
        ("""SELECT send_window_opens('{"start": "8", "end": "21:00"}', 'UTC', now())""", [], "KE008", "HH:MM"),
        ("""SELECT send_window_opens('{"start": "25:00", "end": "21:00"}', 'UTC', now())""", [], "KE008", "HH:MM"),
        ("""SELECT send_window_opens('[1, 2]', 'UTC', now())""", [], "KE008", "send window"),
        ("""SELECT send_window_opens('{"start": "08:00", "end": "21:00"}', 'UTC', NULL)""", [], "KE008", "at"),
    ],
    "claim_queued_jobs": [
        ("SELECT claim_queued_jobs(NULL, 1)", [], "KE008", "worker"),
        ("SELECT claim_queued_jobs('w1', NULL)", [], "KE008", "max_jobs"),
        ("SELECT claim_queued_jobs('w1', 0)", [], "KE008", "max_jobs"),
        ("SELECT claim_queued_jobs('w1', 1001)", [], "KE008", "max_jobs"),
    ],
    "heartbeat_job": [
        ("SELECT heartbeat_job(%s::uuid, 'w1')", [None], "KE008", "job_id"),
        ("SELECT heartbeat_job(%s::uuid, 'w1')", [MISSING], "KE002", MISSING),
        ("SELECT heartbeat_job(%s, NULL)", ["job"], "KE008", "worker"),
    ],
    "release_job": [
        ("SELECT release_job(%s::uuid, 'w1', 'r')", [None], "KE008", "job_id"),
        ("SELECT release_job(%s::uuid, 'w1', 'r')", [MISSING], "KE002", MISSING),
        ("SELECT release_job(%s, NULL, 'r')", ["job"], "KE008", "worker"),
    ],
    "job_context": [
        ("SELECT job_context(%s::uuid, 'w1')", [None], "KE008", "job_id"),
        ("SELECT job_context(%s::uuid, 'w1')", [MISSING], "KE002", MISSING),
        ("SELECT job_context(%s, NULL)", ["job"], "KE008", "worker"),
    ],
    "recover_dispatched_items": [
        ("SELECT recover_dispatched_items(%s::uuid, 'w1', true)", [None], "KE008", "job_id"),
        ("SELECT recover_dispatched_items(%s::uuid, 'w1', true)", [MISSING], "KE002", MISSING),
        ("SELECT recover_dispatched_items(%s, NULL, true)", ["job"], "KE008", "worker"),
        ("SELECT recover_dispatched_items(%s, 'w1', NULL)", ["job"], "KE008", "provider_deduplicates"),
    ],
    "reserve_outbox_items": [
        ("SELECT reserve_outbox_items(%s::uuid, 'w1', 5)", [None], "KE008", "job_id"),
        ("SELECT reserve_outbox_items(%s::uuid, 'w1', 5)", [MISSING], "KE002", MISSING),
        ("SELECT reserve_outbox_items(%s, NULL, 5)", ["job"], "KE008", "worker"),
        ("SELECT reserve_outbox_items(%s, 'w1', NULL)", ["job"], "KE008", "max_items"),
        ("SELECT reserve_outbox_items(%s, 'w1', 0)", ["job"], "KE008", "max_items"),
        ("SELECT reserve_outbox_items(%s, 'w1', -5)", ["job"], "KE008", "max_items"),
        ("SELECT reserve_outbox_items(%s, 'w1', 10001)", ["job"], "KE008", "max_items"),
    ],
    "mark_outbox_dispatched": [
        ("SELECT mark_outbox_dispatched(%s::uuid, 'w1', %s)", [None, "item_ids"], "KE008", "job_id"),
        ("SELECT mark_outbox_dispatched(%s::uuid, 'w1', %s)", [MISSING, "item_ids"], "KE002", MISSING),
        ("SELECT mark_outbox_dispatched(%s, NULL, %s)", ["job", "item_ids"], "KE008", "worker"),
        ("SELECT mark_outbox_dispatched(%s, 'w1', NULL)", ["job"], "KE008", "item_ids"),
    ],
    "record_outbox_results": [
        ("SELECT record_outbox_results(%s::uuid, 'w1', '[]')", [None], "KE008", "job_id"),
        ("SELECT record_outbox_results(%s::uuid, 'w1', '[]')", [MISSING], "KE002", MISSING),
        ("SELECT record_outbox_results(%s, NULL, '[]')", ["job"], "KE008", "worker"),
        ("SELECT record_outbox_results(%s, 'w1', NULL)", ["job"], "KE008", "results"),
    ],
    "complete_job(uuid, boolean, text, text)": [
        ("SELECT complete_job(%s::uuid, true, NULL, 'w1')", [None], "KE008", "job_id"),
        ("SELECT complete_job(%s::uuid, true, NULL, 'w1')", [MISSING], "KE002", MISSING),
        ("SELECT complete_job(%s, NULL, NULL, 'w1')", ["job"], "KE008", "success"),
    ],
    "complete_job(uuid, boolean, text)": [
        ("SELECT complete_job(%s::uuid, true, NULL)", [None], "KE008", "job_id"),
        ("SELECT complete_job(%s::uuid, true, NULL)", [MISSING], "KE002", MISSING),
        ("SELECT complete_job(%s, NULL, NULL)", ["job"], "KE008", "success"),
    ],
    "check_campaign_launch_prerequisites": [
        ("SELECT * FROM check_campaign_launch_prerequisites(NULL, %s)", ["workspace"], "KE008", "campaign_id"),
        ("SELECT * FROM check_campaign_launch_prerequisites(%s, NULL)", ["campaign"], "KE008", "workspace_id"),
    ],
    "cancel_campaign_run": [
        ("SELECT cancel_campaign_run(%s::uuid)", [None], "KE008", "run_id"),
        ("SELECT cancel_campaign_run(%s::uuid)", [MISSING], "KE002", MISSING),
    ],
    "retry_campaign_run(uuid)": [
        ("SELECT retry_campaign_run(%s::uuid)", [None], "KE008", "run_id"),
        ("SELECT retry_campaign_run(%s::uuid)", [MISSING], "KE002", MISSING),
    ],
    "retry_campaign_run(uuid, boolean)": [
        ("SELECT retry_campaign_run(%s::uuid, false)", [None], "KE008", "run_id"),
        ("SELECT retry_campaign_run(%s::uuid, false)", [MISSING], "KE002", MISSING),
        ("SELECT retry_campaign_run(%s, NULL)", ["run"], "KE008", "include_unknown"),
    ],
    "run_details(uuid)": [
        ("SELECT run_details(%s::uuid)", [None], "KE008", "run_id"),
        ("SELECT run_details(%s::uuid)", [MISSING], "KE002", MISSING),
    ],
    "run_details(uuid, integer)": [
        ("SELECT run_details(%s::uuid, 5)", [None], "KE008", "run_id"),
        ("SELECT run_details(%s::uuid, 5)", [MISSING], "KE002", MISSING),
        ("SELECT run_details(%s, NULL)", ["run"], "KE008", "item_limit"),
        ("SELECT run_details(%s, -1)", ["run"], "KE008", "item_limit"),
    ],
    "take_rate_tokens": [
        ("SELECT take_rate_tokens(NULL, 'smtp', 1)", [], "KE008", "workspace_id"),
        ("SELECT take_rate_tokens(%s, NULL, 1)", ["workspace"], "KE008", "provider"),
        ("SELECT take_rate_tokens(%s, 'smtp', NULL)", ["workspace"], "KE008", "wanted"),
        ("SELECT take_rate_tokens(%s, 'smtp', -1)", ["workspace"], "KE008", "wanted"),
    ],
}


@pytest.fixture
def context(conn):
    """A claimed job (worker w1) with reserved items, and the ids around it."""
    seed, run_id, job = deploy_and_claim(conn, 2)
    items = reserve(conn, job["id"])
    return {
        "job": job["id"],
        "item_ids": [i["id"] for i in items],
        "run": run_id,
        "campaign": seed.campaign_id,
        "workspace": seed.workspace_id,
    }


@pytest.mark.parametrize("function", sorted(CASES))
def test_null_and_unknown_arguments_are_refused(conn, context, function):
    for query, args, sqlstate, mention in CASES[function]:
        values = [context.get(a, a) if isinstance(a, str) else a for a in args]
        with refused(conn, sqlstate, mention, case=f"{query} {values}"):
            conn.execute(query, values)

"""run_items: a run's outbox items a page at a time, in id order, of one status when asked
(kernel 1.4.0; `kernel-driver runs show --item-status`)."""

from __future__ import annotations

import uuid

from tests.sql.helpers import deploy, drain_run, refused, rows, seed_campaign


def test_pages_follow_each_other_in_id_order_and_filter_by_status(conn):
    seed = seed_campaign(conn, 7)
    run_id = deploy(conn, seed.campaign_id)
    outcomes = iter(["failed", "sent", "failed", "sent", "unknown", "failed", "sent"])
    drain_run(conn, run_id, lambda item: next(outcomes))
    every = [r["id"] for r in rows(conn, "SELECT id FROM channel_outbox WHERE run_id = %s ORDER BY id", [run_id])]

    first = rows(conn, "SELECT * FROM run_items(%s, NULL, NULL, 3)", [run_id])
    second = rows(conn, "SELECT * FROM run_items(%s, NULL, %s, 3)", [run_id, first[-1]["id"]])
    third = rows(conn, "SELECT * FROM run_items(%s, NULL, %s, 3)", [run_id, second[-1]["id"]])
    assert [r["id"] for r in first + second + third] == every

    failed = rows(conn, "SELECT * FROM run_items(%s, 'failed')", [run_id])
    assert len(failed) == 3 and {r["status"] for r in failed} == {"failed"}
    assert [r["id"] for r in failed] == sorted(r["id"] for r in failed)
    assert rows(conn, "SELECT * FROM run_items(%s, 'pending')", [run_id]) == []


def test_bad_arguments_are_refused(conn):
    run_id = deploy(conn, seed_campaign(conn, 1).campaign_id)
    with refused(conn, "KE008", "not an item status"):
        conn.execute("SELECT * FROM run_items(%s, 'lost')", [run_id])
    with refused(conn, "KE008", "limit"):
        conn.execute("SELECT * FROM run_items(%s, NULL, NULL, 0)", [run_id])
    with refused(conn, "KE002"):
        conn.execute("SELECT * FROM run_items(%s)", [uuid.uuid4()])

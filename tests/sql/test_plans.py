"""The hot path's plans on tables without statistics: a claim and a recording read the rows
they need, not the backlog (kernel 1.3.0; docs/benchmarks.md).

job_queue and channel_outbox grow by thousands of rows a second during a run, faster than
autovacuum analyses them, so the planner takes them for small tables. These tests build such
tables (no ANALYZE) and count the heap tuples a claim fetches in its own transaction
(pg_stat_get_xact_tuples_fetched: a plan that walks the backlog fetches all of it), or read the
recording's plan from auto_explain.
"""

from __future__ import annotations

import pytest

from tests.sql.helpers import add_contacts, deploy, explained, scalar, seed_campaign, sent, step

BACKLOG = 3000


def fetched(conn, table: str, call) -> int:
    """Heap tuples of `table` fetched by index or bitmap scans during `call` (one transaction)."""
    with conn.transaction():
        before = scalar(conn, "SELECT pg_stat_get_xact_tuples_fetched(%s::regclass)", [table])
        call()
        return scalar(conn, "SELECT pg_stat_get_xact_tuples_fetched(%s::regclass)", [table]) - before


@pytest.mark.parametrize("others", [0, 3])
def test_a_claim_takes_the_first_queued_jobs_without_reading_the_backlog(conn, others):
    seeded = seed_campaign(conn, BACKLOG)
    deploy(conn, seeded.campaign_id, 1)  # BACKLOG queued jobs of one contact each
    for _ in range(others):  # other tenants with a few queued jobs of their own
        deploy(conn, seed_campaign(conn, 5).campaign_id, 1)
    assert scalar(conn, "SELECT count(*) FROM job_queue WHERE status = 'queued'") == BACKLOG + 5 * others

    read = fetched(conn, "job_queue", lambda: step(conn, claim=4))

    # 1.2 read every queued job through a bitmap scan and sorted them: 3,000 and more.
    assert read < 50, read


def test_recording_joins_results_and_rows_by_hash_not_by_a_nested_loop(conn):
    seeded = seed_campaign(conn, 5)
    add_contacts(conn, seeded.campaign_id, 495)
    deploy(conn, seeded.campaign_id, 1000)
    out = step(conn, claim=1, want=500)
    job_id, items = out["job"][0]["job_id"], out["item"]

    with explained(conn) as logged:
        for first in range(0, 500, 100):  # as a daemon records, step after step
            step(conn, held=[job_id], results=sent(items[first:first + 100]))

    plans = [e.plan for e in logged]
    recording = [plan for plan in plans if "Update on channel_outbox" in plan and "unnest(p_result_ids" in plan]
    assert len(recording) == 5, plans
    # 1.2 let the planner nest a loop comparing every result with every row of a fresh outbox
    # (124,750 comparisons for 250 results, 31 ms, seen in a daemon); a hash join probes once.
    for plan in recording:
        assert "Hash Join" in plan and "Nested Loop" not in plan, plan
    assert scalar(conn, "SELECT count(*) FROM channel_outbox WHERE status = 'sent'") == 500


def test_a_claim_is_never_jit_compiled(conn):
    # The planner prices the claim's recursive walks far above what they read; above
    # jit_above_cost JIT compiled it on every call: 50 ms of a 1 ms claim (kernel 1.4.0).
    if not scalar(conn, "SELECT pg_jit_available()"):
        pytest.skip("this PostgreSQL has no JIT provider")
    for _ in range(3):
        deploy(conn, seed_campaign(conn, 2).campaign_id, 1)
    conn.execute("SET jit_above_cost = 0")  # JIT for every statement the claim does not guard
    with explained(conn) as logged:
        conn.execute("SET auto_explain.log_analyze = on")
        assert len(step(conn, claim=2)["job"]) == 2
    claims = [e.plan for e in logged if "WITH RECURSIVE expired" in e.plan]
    assert claims and not [plan for plan in claims if "JIT:" in plan], claims


def test_dispatch_finds_a_jobs_contacts_by_their_primary_key(conn):
    # A draft of 1.5.0 joined them on (id, tenant_id) while contacts were keyed by id alone: the
    # planner then walked the tenant's contacts_by_tenant_workspace_idx, every contact of the
    # tenant for each dispatch (one-contact campaigns 25 % slower, docs/scale-out.md).
    seeded = seed_campaign(conn, 1)
    for _ in range(300):
        extra = seed_campaign(conn, 1, tenant_id=seeded.tenant_id, workspace_id=seeded.workspace_id)
        deploy(conn, extra.campaign_id)
    with explained(conn) as logged:
        assert len(step(conn, claim=16, want=16)["item"]) == 16
    dispatch = [e.plan for e in logged if "worker_step" in e.where and "on contacts p" in e.plan]
    assert dispatch, [e.plan for e in logged]
    for plan in dispatch:
        assert "using contacts_pkey on contacts p" in plan, plan

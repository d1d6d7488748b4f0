"""Distribution by tenant (issue 10 item 6, docs/scale-out.md): the catalog's keys, and every
statement the kernel's functions run.

Citus routes a statement to one tenant's shard only when each distributed table it reads is
restricted to that tenant (tenant_id = a value, or joined on tenant_id to a table that is). The
plans show it: auto_explain logs every statement run inside the functions, and each scan of a
tenant table must carry a tenant_id condition, its own or its join's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.sql.helpers import (
    deploy,
    explained,
    rows,
    scalar,
    seed_campaign,
    sent,
    step,
)

KERNEL_TABLES = {"campaign_runs", "job_queue", "channel_outbox", "job_events", "rate_buckets", "job_item_counts"}
CONDITIONS = ("Index Cond", "Filter", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter", "TID Cond")


# What 1.5.0 leaves (docs/scale-out.md, "What is left"): the host tables keep their keys while
# kernel statements still find contacts and campaigns by id alone. This list only shrinks.
HOST_TABLE_KEYS = {
    ("campaign_audience", None), ("campaign_audience", "campaign_audience_campaign_id_fkey"),
    ("campaign_audience", "campaign_audience_contact_id_fkey"), ("campaigns", "campaigns_pkey"),
    ("contacts", "contacts_pkey"), ("provider_configs", "provider_configs_pkey"),
    ("workspaces", "workspaces_pkey"),
}


def test_only_the_host_tables_break_a_distribution_rule(conn):
    found = {(r["table_name"].split(".")[-1], r["object_name"])
             for r in rows(conn, "SELECT table_name::text, object_name::text FROM distribution_violations()")}
    assert found == HOST_TABLE_KEYS


def test_every_key_of_the_kernels_tables_includes_tenant_id(conn, kernel_schema):
    keys = rows(
        conn,
        "SELECT c.conrelid::regclass::text AS tbl, c.conname, c.contype,"
        " array(SELECT a.attname::text FROM unnest(c.conkey) AS k JOIN pg_attribute AS a"
        "       ON a.attrelid = c.conrelid AND a.attnum = k) AS cols"
        " FROM pg_constraint AS c WHERE c.connamespace = %s::regnamespace AND c.contype IN ('p', 'u', 'f')",
        [kernel_schema],
    )
    kernel_keys = [k for k in keys if k["tbl"].split(".")[-1] in KERNEL_TABLES]
    assert len(kernel_keys) == 13
    assert [k["conname"] for k in kernel_keys if "tenant_id" not in k["cols"]] == []


@pytest.mark.parametrize(("ddl", "problem"), [
    ("CREATE UNIQUE INDEX stray_email ON {s}.contacts (email)", "unique without tenant_id"),
    ("ALTER TABLE {s}.campaign_runs ADD CONSTRAINT stray_fk FOREIGN KEY (campaign_id, workspace_id)"
     " REFERENCES {s}.campaigns (id, tenant_id)", "does not pair tenant_id"),
    ("CREATE TABLE public.app_orders (id int, contact_id uuid, tenant_id uuid,"
     " CONSTRAINT app_orders_contact FOREIGN KEY (contact_id) REFERENCES {s}.contacts (id))",
     "must include it"),
    ("CREATE TABLE {s}.stray (id int)", "has no tenant_id"),
    ("ALTER TABLE {s}.state_transitions ADD COLUMN run_id uuid, ADD COLUMN tenant_id uuid,"
     " ADD CONSTRAINT stray_ref FOREIGN KEY (run_id, tenant_id) REFERENCES {s}.campaign_runs (id, tenant_id)",
     "reference table may not"),
])
def test_a_broken_rule_is_reported(connect, kernel_schema, ddl, problem):
    """Each rule, broken once (in a transaction rolled back: the module's database stays clean)."""
    with connect() as conn, conn.transaction(force_rollback=True):
        before = rows(conn, "SELECT * FROM distribution_violations()")
        conn.execute(ddl.format(s=kernel_schema))
        found = [f for f in rows(conn, "SELECT * FROM distribution_violations()") if f not in before]
        assert any(problem in f["problem"] for f in found), found


# Functions that read a tenant table by id alone somewhere (docs/scale-out.md, "What is left"):
# right on one PostgreSQL (ids are unique), a query across every shard under Citus. A function
# that starts reading another table so, or a new function that does, fails the test; one that
# is pinned to its tenant must leave this list.
UNPINNED = {
    "_claim_jobs: campaign_runs",
    "_claim_jobs: job_queue",
    "_finish_runs_if_done: campaign_runs",
    "_finish_runs_if_done: channel_outbox",
    "_finish_runs_if_done: job_queue",
    "_lock_campaign_without_active_run: campaign_runs",
    "_lock_campaign_without_active_run: campaigns",
    "_take_rate_tokens: provider_configs",
    "_workspace_guard: workspaces",
    "cancel_campaign_run: campaign_runs",
    "cancel_campaign_run: channel_outbox",
    "cancel_campaign_run: job_queue",
    "check_campaign_launch_prerequisites: campaign_runs",
    "check_campaign_launch_prerequisites: campaigns",
    "check_campaign_launch_prerequisites: contacts",
    "retry_campaign_run: campaign_runs",
    "retry_campaign_run: channel_outbox",
    "run_details: campaign_runs",
    "run_details: channel_outbox",
    "run_details: job_events",
    "run_details: job_queue",
    "run_items: campaign_runs",
    "run_items: channel_outbox",
    "worker_step: campaign_runs",
    "worker_step: channel_outbox",
    "worker_step: contacts",
    "worker_step: job_queue",
    "worker_step: provider_configs",
}


# --- the statements ------------------------------------------------------------------------

def unrestricted_scans(plan: dict[str, Any], tenant_tables: set[str], joined: str = "") -> Iterator[str]:
    """Tenant tables scanned with no tenant_id condition of their own or of a join above them."""
    here = " ".join(str(plan.get(c, "")) for c in CONDITIONS)
    relation = plan.get("Relation Name")
    if relation in tenant_tables and "Scan" in plan["Node Type"]:
        alias = plan.get("Alias", relation)
        if "tenant_id" not in here and not re.search(rf"\b{re.escape(alias)}\.tenant_id\b", joined):
            yield relation
    for child in plan.get("Plans", []):
        yield from unrestricted_scans(child, tenant_tables, joined + " " + here)


def workload(conn: psycopg.Connection) -> None:
    """Every public function of the kernel's life cycle, for two tenants."""
    first = seed_campaign(conn, 3)
    other = seed_campaign(conn, 2)
    for seed in (first, other):
        rows(conn, "SELECT * FROM check_campaign_launch_prerequisites(%s, %s)", [seed.campaign_id, seed.workspace_id])
    run_id = deploy(conn, first.campaign_id)
    deploy(conn, other.campaign_id)
    out = step(conn, claim=1, want=3, tenant=first.tenant_id)
    job_id = out["job"][0]["job_id"]
    items = out["item"]
    results = [*sent(items[:2]), (items[2]["item_id"], "failed", None, "bounced")]
    step(conn, held=[job_id], results=results, complete=[job_id], tenant=first.tenant_id)
    retry_id = scalar(conn, "SELECT retry_campaign_run(%s, false)", [run_id])
    rows(conn, "SELECT * FROM run_details(%s)", [run_id])
    rows(conn, "SELECT * FROM run_items(%s, NULL, NULL, 10)", [run_id])
    conn.execute("SELECT cancel_campaign_run(%s)", [retry_id])
    rows(conn, "SELECT take_rate_tokens(%s, 'smtp', 1)", [first.workspace_id])


def test_no_function_reads_more_tenants_than_it_did(conn, kernel_schema):
    tenant_tables = {r["relname"] for r in rows(
        conn,
        "SELECT c.relname::text FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid"
        " WHERE c.relnamespace = %s::regnamespace AND c.relkind = 'r' AND a.attname = 'tenant_id'",
        [kernel_schema],
    )}
    with explained(conn, "json") as logged:
        workload(conn)
    plans = [(function_of(e.where), json.loads(e.plan.split("plan:", 1)[1])["Plan"])
             for e in logged if e.where != "top level" and "plan:" in e.plan]
    assert {"worker_step", "_claim_jobs", "deploy_campaign", "retry_campaign_run", "run_items"} <= {
        function for function, _ in plans}
    found = {f"{function}: {relation}" for function, plan in plans
             for relation in unrestricted_scans(plan, tenant_tables)}
    assert found == UNPINNED, (sorted(found - UNPINNED), sorted(UNPINNED - found))


def function_of(where: str) -> str:
    """'kernel.worker_step(text,…) line 61 at …' → 'worker_step'."""
    return where.split("(", 1)[0].split(".")[-1]

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
    claim,
    complete,
    deploy,
    dispatch,
    explained,
    record,
    reserve,
    result,
    rows,
    scalar,
    seed_campaign,
    sent,
    step,
)

KERNEL_TABLES = {"campaign_runs", "job_queue", "channel_outbox", "job_events", "rate_buckets", "job_item_counts"}
CONDITIONS = ("Index Cond", "Filter", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter", "TID Cond")


def test_nothing_breaks_a_distribution_rule(conn):
    """1.7 keyed the host tables by tenant: a fresh kernel is ready to distribute."""
    assert rows(conn, "SELECT * FROM distribution_violations()") == []


def test_the_reference_tables_are_the_ones_without_tenant_keys(conn):
    """workspaces is the directory of which tenant owns a workspace id, keyed by id alone (a
    workspace belongs to one tenant): every node holds it whole, beside the state machine."""
    found = {r["t"].split(".")[-1] for r in rows(conn, "SELECT t::text FROM reference_tables() AS t")}
    assert found == {"state_transitions", "schema_migrations", "workspaces"}


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
    ("CREATE UNIQUE INDEX stray_id ON {s}.contacts (id);"
     " CREATE TABLE public.app_orders (id int, contact_id uuid, tenant_id uuid,"
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


# The only statements that read a tenant table by id alone: kernel._tenant_of finds the tenant
# of a run, job or campaign id that came without one (operator commands, deploy, the 1.0
# per-job functions), unless the session is scoped. Under Citus each is one index probe on
# every shard; everything after it runs on the tenant's. A function that starts reading a
# table by id alone fails the test.
LOOKUPS = {
    "_tenant_of: campaign_runs",
    "_tenant_of: campaigns",
    "_tenant_of: job_queue",
}


# --- the statements ------------------------------------------------------------------------

def unrestricted_scans(plan: dict[str, Any], tenant_tables: set[str], joined: str = "") -> Iterator[str]:
    """Tenant tables scanned with no tenant_id condition of their own or of a join above them.

    Not counted, as they read no row: a branch the planner proved never runs (a one-time filter
    of false: the all-tenants walk of a claim given its tenants), and an index scan for an empty
    list of ids (PostgreSQL then shows no other condition of the statement)."""
    if plan.get("One-Time Filter") == "false":
        return
    here = " ".join(str(plan.get(c, "")) for c in CONDITIONS)
    relation = plan.get("Relation Name")
    reads_nothing = "= ANY ('{}'" in str(plan.get("Index Cond", ""))
    if relation in tenant_tables and "Scan" in plan["Node Type"] and not reads_nothing:
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
    per_job_functions(conn)
    hand_backs(conn)


def per_job_functions(conn: psycopg.Connection) -> None:
    """The 1.0 functions, one job at a time (a claim without --tenant walks every tenant: scoped)."""
    seed = seed_campaign(conn, 2)
    deploy(conn, seed.campaign_id, batch_size=1)
    with conn.transaction():
        conn.execute("SELECT scope(%s)", [seed.tenant_id])
        job, other = claim(conn, "w2", 2)
    scalar(conn, "SELECT job_context(%s, 'w2')", [job["id"]])
    scalar(conn, "SELECT heartbeat_job(%s, 'w2')", [job["id"]])
    (item,) = reserve(conn, job["id"], "w2")
    dispatch(conn, job["id"], "w2", [item["id"]])
    scalar(conn, "SELECT recover_dispatched_items(%s, 'w2', true)", [job["id"]])
    dispatch(conn, job["id"], "w2", [item["id"]])
    record(conn, job["id"], "w2", [result(item["id"], "sent")])
    complete(conn, job["id"], "w2")
    conn.execute("SELECT release_job(%s, 'w2', 'x')", [other["id"]])


def hand_backs(conn: psycopg.Connection) -> None:
    """The daemon's, naming its tenant: after a lost connection, and on shutdown."""
    seed = seed_campaign(conn, 2)
    deploy(conn, seed.campaign_id)
    job_id = step(conn, "w3", claim=1, want=1, tenant=seed.tenant_id)["job"][0]["job_id"]
    rows(conn, "SELECT * FROM undispatch_items('w3', %s::uuid[], '{}'::uuid[], %s::uuid[])",
         [[job_id], [seed.tenant_id]])
    scalar(conn, "SELECT release_jobs('w3', %s::uuid[], 'x', %s::uuid[])", [[job_id], [seed.tenant_id]])


def test_every_statement_names_its_tenant(conn, kernel_schema):
    tenant_tables = {r["relname"] for r in rows(
        conn,
        "SELECT c.relname::text FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid"
        " WHERE c.relnamespace = %s::regnamespace AND c.relkind = 'r' AND a.attname = 'tenant_id'"
        " AND c.oid NOT IN (SELECT reference_tables())",
        [kernel_schema],
    )}
    assert {"campaigns", "contacts", "campaign_audience", "provider_configs"} <= tenant_tables
    with explained(conn, "json") as logged:
        workload(conn)
    plans = [(function_of(e.where), json.loads(e.plan.split("plan:", 1)[1])["Plan"])
             for e in logged if e.where != "top level" and "plan:" in e.plan]
    assert {"worker_step", "_claim_jobs", "deploy_campaign", "retry_campaign_run", "run_items",
            "reserve_outbox_items", "record_outbox_results", "undispatch_items", "release_jobs"} <= {
        function for function, _ in plans}
    found = {f"{function}: {relation}" for function, plan in plans
             for relation in unrestricted_scans(plan, tenant_tables)}
    assert found == LOOKUPS, (sorted(found - LOOKUPS), sorted(LOOKUPS - found))


def function_of(where: str) -> str:
    """'kernel.worker_step(text,…) line 61 at …' → 'worker_step'."""
    return where.split("(", 1)[0].split(".")[-1]

"""Tenancy: row-level security for the app and reader roles, the functions' scope checks
(another tenant's id looks missing: KE002), KE009 without a scope, and role privileges."""

from __future__ import annotations

import uuid

import pytest

from tests.sql.helpers import (
    as_role,
    claim,
    deploy,
    fingerprint,
    raises,
    refused,
    reserve,
    rows,
    run_job,
    scalar,
    seed_campaign,
)

VISIBLE_TABLES = [
    "campaigns", "contacts", "campaign_audience", "provider_configs", "campaign_runs", "job_queue",
    "channel_outbox", "job_events",
]


@pytest.fixture
def tenants(conn):
    """Tenants A and B, each with a finished run (items, events) and a second queued campaign."""
    found = {}
    for name in ("A", "B"):
        seed = seed_campaign(conn, 3)
        run_id = deploy(conn, seed.campaign_id)
        (job,) = claim(conn, f"w-{name}", 1)
        run_job(conn, job["id"], f"w-{name}", "failed")
        found[name] = {"seed": seed, "run": run_id}
    for tenant in found.values():
        seed = tenant["seed"]
        tenant["queued"] = seed_campaign(conn, 2, tenant_id=seed.tenant_id, workspace_id=seed.workspace_id)
        tenant["queued_run"] = deploy(conn, tenant["queued"].campaign_id)
    return found


def visible_tenants(conn, table):
    """The tenant ids of the rows this session can see in ``table``."""
    if table == "campaign_audience":
        query = "SELECT c.tenant_id FROM campaign_audience AS a JOIN contacts AS c ON c.id = a.contact_id"
    else:
        query = f"SELECT tenant_id FROM {table}"
    return [r[0] for r in conn.execute(query)]


@pytest.mark.parametrize("role", ["app", "reader"])
def test_a_tenant_sees_only_its_rows(conn, kernel_schema, tenants, role):
    a = tenants["A"]["seed"].tenant_id
    totals = {t: len(visible_tenants(conn, t)) for t in VISIBLE_TABLES}
    with as_role(conn, kernel_schema, role, a):
        for table in VISIBLE_TABLES:
            seen = visible_tenants(conn, table)
            assert seen and set(seen) == {a}, table
            assert len(seen) < totals[table], table


@pytest.mark.parametrize("role", ["app", "reader"])
def test_nothing_is_visible_without_a_tenant(conn, kernel_schema, tenants, role):
    with as_role(conn, kernel_schema, role):
        for table in VISIBLE_TABLES:
            assert scalar(conn, f"SELECT count(*) FROM {table}") == 0, table


def test_the_workspace_setting_narrows_the_scope(conn, kernel_schema, tenants):
    seed = tenants["A"]["seed"]
    other = seed_campaign(conn, 1, tenant_id=seed.tenant_id)  # same tenant, another workspace
    with as_role(conn, kernel_schema, "app", seed.tenant_id, seed.workspace_id):
        assert other.campaign_id not in [r[0] for r in conn.execute("SELECT id FROM campaigns")]
        assert scalar(conn, "SELECT count(*) FROM campaigns") == 2
        with raises("KE002", other.campaign_id):
            deploy(conn, other.campaign_id)
    with as_role(conn, kernel_schema, "app", seed.tenant_id):
        assert scalar(conn, "SELECT count(*) FROM campaigns") == 3


def message_shape(exc, ident):
    return exc.diag.message_primary.replace(str(ident), "<id>")


FOREIGN_CALLS = {
    "deploy": ("SELECT deploy_campaign(%s)", "campaign"),
    "deploy-batched": ("SELECT deploy_campaign(%s, 10)", "campaign"),
    "cancel": ("SELECT cancel_campaign_run(%s)", "queued_run"),
    "retry": ("SELECT retry_campaign_run(%s)", "run"),
    "retry-unknown": ("SELECT retry_campaign_run(%s, true)", "run"),
    "run_details": ("SELECT run_details(%s)", "run"),
    "run_details-limited": ("SELECT run_details(%s, 5)", "run"),
    "run_items": ("SELECT * FROM run_items(%s)", "run"),
    "deploy-scheduled": ("SELECT deploy_campaign(%s, now() + interval '1 day')", "campaign"),
    "check_prerequisites": ("SELECT * FROM check_campaign_launch_prerequisites(%s, '{workspace}')", "campaign"),
}


def foreign_id(tenant, kind):
    return tenant["seed"].campaign_id if kind == "campaign" else tenant[kind]


def prerequisite_rows(conn, query, campaign_id, shown_as):
    """The check rows for campaign_id, with its id written as shown_as."""
    return [tuple(str(v).replace(str(campaign_id), str(shown_as)) for v in row)
            for row in conn.execute(query, [campaign_id]).fetchall()]


def test_another_tenants_id_looks_missing(conn, kernel_schema, tenants):
    b = tenants["B"]
    before = fingerprint(conn)
    with as_role(conn, kernel_schema, "app", tenants["A"]["seed"].tenant_id):
        for call, (query, kind) in FOREIGN_CALLS.items():
            query = query.replace("{workspace}", str(b["seed"].workspace_id))
            theirs, missing = foreign_id(b, kind), uuid.uuid4()
            if call == "check_prerequisites":  # a missing campaign is a failed check, not an error
                assert (prerequisite_rows(conn, query, theirs, missing)
                        == prerequisite_rows(conn, query, missing, missing))
                continue
            with raises("KE002", theirs, case=call) as foreign:
                conn.execute(query, [theirs])
            with raises("KE002", missing, case=call) as absent:
                conn.execute(query, [missing])
            assert message_shape(foreign.value, theirs) == message_shape(absent.value, missing), call
    assert fingerprint(conn) == before


def test_own_ids_work_for_the_app(conn, kernel_schema, tenants):
    a = tenants["A"]
    with as_role(conn, kernel_schema, "app", a["seed"].tenant_id):
        assert scalar(conn, "SELECT run_details(%s)", [a["run"]])["run"]["id"] == str(a["run"])
        new = scalar(conn, "SELECT retry_campaign_run(%s)", [a["run"]])
        conn.execute("SELECT cancel_campaign_run(%s)", [new])
        assert len(rows(conn, "SELECT * FROM check_campaign_launch_prerequisites(%s, %s)",
                        [a["seed"].campaign_id, a["seed"].workspace_id])) == 8
        assert {r["status"]: r["jobs"] for r in rows(conn, "SELECT * FROM queue_stats()")} == {"queued": 1}


@pytest.mark.parametrize(
    ("role", "calls"),
    [("app", ["deploy", "cancel", "retry", "run_details", "check_prerequisites"]),
     ("reader", ["run_details", "check_prerequisites"])],  # the reader may call no other
)
def test_an_application_role_without_a_tenant_gets_ke009(conn, kernel_schema, tenants, role, calls):
    a = tenants["A"]
    for call in calls:
        query, kind = FOREIGN_CALLS[call]
        query = query.replace("{workspace}", str(a["seed"].workspace_id))
        for some_id in (foreign_id(a, kind), uuid.uuid4()):  # existing or not: the scope comes first
            with refused(conn, "KE009", case=call), as_role(conn, kernel_schema, role):
                conn.execute(query, [some_id])


def test_app_cannot_write_rows_of_another_tenant(conn, kernel_schema, tenants):
    a, b = tenants["A"]["seed"], tenants["B"]["seed"]
    with as_role(conn, kernel_schema, "app", a.tenant_id):
        # Refused before RLS's WITH CHECK (1.0 said 42501 there), as if the workspace or the
        # campaign did not exist: tests/sql/test_hostile.py shows that nothing leaks.
        with raises("KE002", b.workspace_id):
            conn.execute("INSERT INTO contacts (tenant_id, workspace_id, email) VALUES (%s, %s, 'x@y.z')",
                         [b.tenant_id, b.workspace_id])
        with raises("KE002", b.campaign_id):  # B's campaign is not there to pair with
            conn.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [b.campaign_id, a.contact_ids[0]])
        with raises("KE002", b.workspace_id):
            conn.execute("INSERT INTO provider_configs (workspace_id, channel, provider, tenant_id)"
                         " VALUES (%s, 'voice', 'twilio', %s)", [b.workspace_id, b.tenant_id])
        with raises("KE008"):  # ownership never moves (a trigger, before RLS's WITH CHECK)
            conn.execute("UPDATE contacts SET tenant_id = %s WHERE id = %s", [b.tenant_id, a.contact_ids[0]])
        # Another tenant's rows are simply not there to change.
        stolen = conn.execute("UPDATE contacts SET email = 'stolen@x.y' WHERE tenant_id = %s", [b.tenant_id])
        assert stolen.rowcount == 0
        assert conn.execute("DELETE FROM campaigns WHERE id = %s", [b.campaign_id]).rowcount == 0
        # Its own rows it may write (provider_configs.tenant_id defaults to the session's tenant).
        conn.execute("INSERT INTO contacts (tenant_id, workspace_id, email) VALUES (%s, %s, 'new@a.z')",
                     [a.tenant_id, a.workspace_id])
        conn.execute("INSERT INTO provider_configs (workspace_id, channel, provider) VALUES (%s, 'voice', 'twilio')",
                     [a.workspace_id])
    assert scalar(conn, "SELECT tenant_id FROM provider_configs WHERE channel = 'voice'") == a.tenant_id
    assert scalar(conn, "SELECT count(*) FROM contacts WHERE email = 'stolen@x.y'") == 0


def test_app_cannot_write_kernel_tables(conn, kernel_schema, tenants):
    for table in ["campaign_runs", "job_queue", "channel_outbox", "job_events", "rate_buckets"]:
        with refused(conn, "42501", case=table), as_role(conn, kernel_schema, "app", tenants["A"]["seed"].tenant_id):
            conn.execute(f"DELETE FROM {table}")


READER_WRITES = [
    "INSERT INTO campaigns (tenant_id, workspace_id, name, channel) VALUES ('{tenant}', '{workspace}', 'n', 'email')",
    "UPDATE contacts SET unsubscribed = true",
    "DELETE FROM campaign_audience",
    "UPDATE campaign_runs SET error_message = 'x'",
    "SELECT deploy_campaign('{campaign}')",
    "SELECT retry_campaign_run('{run}')",
    "SELECT cancel_campaign_run('{queued_run}')",
    "SELECT claim_queued_jobs('reader', 1)",
]


def test_reader_cannot_write(conn, kernel_schema, tenants):
    a = tenants["A"]
    values = {"tenant": a["seed"].tenant_id, "workspace": a["seed"].workspace_id,
              "campaign": a["queued"].campaign_id, "run": a["run"], "queued_run": a["queued_run"]}
    before = scalar(conn, "SELECT count(*) FROM contacts WHERE unsubscribed")
    for statement in READER_WRITES:
        statement = statement.format(**values)
        with refused(conn, "42501", case=statement), as_role(conn, kernel_schema, "reader", a["seed"].tenant_id):
            conn.execute(statement)
    assert scalar(conn, "SELECT count(*) FROM contacts WHERE unsubscribed") == before


def test_worker_cannot_read_tables(conn, kernel_schema, tenants):
    with as_role(conn, kernel_schema, "worker"):
        for table in [*VISIBLE_TABLES, "rate_buckets"]:
            with raises("42501", case=table):
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")


def test_worker_and_app_cannot_call_each_others_functions(conn, kernel_schema, tenants):
    a = tenants["A"]
    with as_role(conn, kernel_schema, "worker"), raises("42501"):
        conn.execute("SELECT deploy_campaign(%s)", [a["queued"].campaign_id])
    with as_role(conn, kernel_schema, "app", a["seed"].tenant_id), raises("42501"):
        conn.execute("SELECT claim_queued_jobs('app', 1)")


def test_unscoped_worker_claims_every_tenants_jobs(conn, kernel_schema, tenants):
    with as_role(conn, kernel_schema, "worker"):
        jobs = claim(conn, "w1", 10)
    assert {j["tenant_id"] for j in jobs} == {tenants["A"]["seed"].tenant_id, tenants["B"]["seed"].tenant_id}


def test_worker_scoped_to_a_tenant_claims_only_its_jobs(conn, kernel_schema, tenants):
    a, b = tenants["A"], tenants["B"]
    with as_role(conn, kernel_schema, "worker", a["seed"].tenant_id):
        jobs = claim(conn, "wa", 10)
        assert [j["run_id"] for j in jobs] == [a["queued_run"]]
        assert len(reserve(conn, jobs[0]["id"], "wa")) == 2
    # B's job is left for someone else, and a worker scoped to A cannot touch it.
    with as_role(conn, kernel_schema, "worker"):
        (theirs,) = claim(conn, "wb", 10)
    assert theirs["run_id"] == b["queued_run"]
    with refused(conn, "KE002", theirs["id"]), as_role(conn, kernel_schema, "worker", a["seed"].tenant_id):
        reserve(conn, theirs["id"], "wb")


def test_audience_across_tenants_is_refused(conn, tenants):
    a, b = tenants["A"]["seed"], tenants["B"]["seed"]
    with refused(conn, "KE008", b.contact_ids[0], a.campaign_id):
        conn.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [a.campaign_id, b.contact_ids[0]])
    with raises("KE008"):
        conn.execute("UPDATE campaign_audience SET contact_id = %s WHERE contact_id = %s",
                     [b.contact_ids[0], a.contact_ids[0]])


def test_audience_across_workspaces_of_one_tenant_is_refused(conn, kernel_schema, tenants):
    a = tenants["A"]["seed"]
    other = seed_campaign(conn, 1, tenant_id=a.tenant_id)  # another workspace
    with as_role(conn, kernel_schema, "app", a.tenant_id), raises("KE008"):
        conn.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [other.campaign_id, a.contact_ids[0]])


def test_moving_an_audience_contact_to_another_workspace_is_refused(conn, kernel_schema, tenants):
    a = tenants["A"]["seed"]
    with as_role(conn, kernel_schema, "app", a.tenant_id), raises("KE008"):
        conn.execute("UPDATE contacts SET workspace_id = %s WHERE id = %s", [uuid.uuid4(), a.contact_ids[0]])


@pytest.mark.parametrize("role", ["app", "reader"])
def test_queue_stats_needs_a_tenant_for_application_roles(conn, kernel_schema, tenants, role):
    with as_role(conn, kernel_schema, role), raises("KE009"):
        conn.execute("SELECT * FROM queue_stats()").fetchall()

"""Tenant isolation against a hostile session, as real LOGIN roles (kernel 1.1).

A tenant's login may create objects in a schema of its own and put it ahead of pg_catalog on
its search_path: operators and functions there then shadow the built-in ones for every
expression parsed with that path. The RLS predicates and every SECURITY DEFINER function must
not care (issue: "Tenant isolation that holds against a hostile session"). Also: another
tenant's workspace cannot be named, a worker cannot end a job it does not hold, and scoping
lives in the transaction.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import psycopg
import pytest
from psycopg import sql

from tests.integration.daemon import client_dsn, login_role
from tests.sql.helpers import (
    claim_one,
    deploy,
    raises,
    reserve,
    rows,
    run_job,
    scalar,
    seed_campaign,
)

TENANT_TABLES = [
    "workspaces", "campaigns", "contacts", "campaign_audience", "provider_configs", "campaign_runs",
    "job_queue", "channel_outbox", "job_events",
]
HOST_TABLES = ["workspaces", "campaigns", "contacts", "campaign_audience", "provider_configs"]
EVERYTHING = [*HOST_TABLES, "campaign_runs", "job_queue", "channel_outbox", "job_events", "rate_buckets"]

Login = Callable[..., psycopg.Connection]


@pytest.fixture
def login(conn, db_dsn, kernel_schema) -> Iterator[Login]:
    """login(role, evil=True): a connection as a new LOGIN role granted <schema>_<role>.

    With evil, the role owns a schema whose look-alikes of built-in operators and functions log
    each call to evil.calls and lie (= is always true, current_setting names another tenant,
    pg_has_role says yes, now() is in 2000), and that schema comes first on its search_path.
    """
    made = ExitStack()

    def open_login(role: str, *, evil: bool = True) -> psycopg.Connection:
        user = made.enter_context(login_role(conn, kernel_schema, role))
        hostile = psycopg.connect(client_dsn(db_dsn, user=user), autocommit=True)
        made.callback(hostile.close)  # before its role is dropped
        if evil:
            schema = f"evil_{secrets.token_hex(3)}"
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(schema), sql.Identifier(user)))
            plant_look_alikes(hostile, schema)
            hostile.execute(sql.SQL("SET search_path = {}, pg_catalog, {}").format(
                sql.Identifier(schema), sql.Identifier(kernel_schema)))
            prove_shadows_reachable(hostile)
        else:
            hostile.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(kernel_schema)))
        return hostile

    with made:
        yield open_login


OTHER_TENANT = "00000000-0000-4000-8000-00000000beef"


def plant_look_alikes(hostile: psycopg.Connection, schema: str) -> None:
    s = sql.Identifier(schema)
    statements = [
        "CREATE TABLE {s}.calls (what text)",
        "GRANT USAGE ON SCHEMA {s} TO PUBLIC",
        "GRANT INSERT ON {s}.calls TO PUBLIC",
        # Each look-alike logs its call, then lies.
        "CREATE FUNCTION {s}.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO {s}.calls VALUES ('=(uuid,uuid)'); RETURN true; END$$",
        "CREATE OPERATOR {s}.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = {s}.uuid_eq)",
        "CREATE FUNCTION {s}.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO {s}.calls VALUES ('=(text,text)'); RETURN true; END$$",
        "CREATE OPERATOR {s}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {s}.text_eq)",
        "CREATE FUNCTION {s}.text_ne(text, text) RETURNS boolean LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO {s}.calls VALUES ('<>(text,text)'); RETURN false; END$$",
        "CREATE OPERATOR {s}.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = {s}.text_ne)",
        "CREATE FUNCTION {s}.current_setting(text, boolean) RETURNS text LANGUAGE plpgsql AS"
        f" $$BEGIN INSERT INTO {{s}}.calls VALUES ('current_setting'); RETURN '{OTHER_TENANT}'; END$$",
        "CREATE FUNCTION {s}.pg_has_role(name, text, text) RETURNS boolean LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO {s}.calls VALUES ('pg_has_role'); RETURN true; END$$",
        "CREATE FUNCTION {s}.now() RETURNS timestamptz LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO {s}.calls VALUES ('now'); RETURN '2000-01-01'; END$$",
    ]
    for statement in statements:
        hostile.execute(sql.SQL(statement).format(s=s))


def prove_shadows_reachable(hostile: psycopg.Connection) -> None:
    """The control: with this search_path the look-alikes really do answer, so a test that
    finds them uncalled inside the kernel can fail."""
    row = hostile.execute(
        "SELECT gen_random_uuid() = gen_random_uuid(), 'a'::text = 'b'::text,"
        " current_setting('execution_kernel.tenant_id', true), now() < '2001-01-01'"
    ).fetchone()
    assert row == (True, True, OTHER_TENANT, True)
    assert evil_calls(hostile) >= 4
    hostile.execute("TRUNCATE calls")


def evil_calls(hostile: psycopg.Connection) -> int:
    return hostile.execute("SELECT count(*) FROM calls").fetchone()[0]


def scoped(hostile: psycopg.Connection, tenant: uuid.UUID | None) -> None:
    hostile.execute("SELECT pg_catalog.set_config('execution_kernel.tenant_id', %s, false)",
                    ["" if tenant is None else str(tenant)])


def table_digest(conn: psycopg.Connection, table: str, tenant: uuid.UUID | None = None) -> tuple:
    where = sql.SQL("")
    if tenant is not None and table == "campaign_audience":
        where = sql.SQL(" WHERE campaign_id IN (SELECT id FROM campaigns WHERE tenant_id = {})").format(
            sql.Literal(str(tenant)))
    elif tenant is not None and table != "rate_buckets":
        where = sql.SQL(" WHERE tenant_id = {}").format(sql.Literal(str(tenant)))
    return conn.execute(sql.SQL(
        "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} AS t{}"
    ).format(sql.Identifier(table), where)).fetchone()


def digests(conn: psycopg.Connection, tenant: uuid.UUID | None = None) -> dict[str, tuple]:
    """Row count and digest of each table (those this kernel has: 1.0 lacks workspaces)."""
    return {table: table_digest(conn, table, tenant) for table in EVERYTHING
            if scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", [table])}


@pytest.fixture
def two_tenants(conn):
    """Tenants A and B, each with a finished run and a queued one (jobs, items, events)."""
    found = {}
    for name in ("A", "B"):
        seed = seed_campaign(conn, 3)
        run_id = deploy(conn, seed.campaign_id)
        job = claim_one(conn, f"w-{name}")
        run_job(conn, job["id"], f"w-{name}", "failed")
        queued = seed_campaign(conn, 2, tenant_id=seed.tenant_id, workspace_id=seed.workspace_id)
        found[name] = {"seed": seed, "run": run_id, "job": job["id"], "queued": queued,
                       "queued_run": deploy(conn, queued.campaign_id)}
    return found


# --- 1. the RLS predicates ignore the caller's search_path ----------------------------------


def visible_tenants(hostile: psycopg.Connection, table: str) -> set[str]:
    if table == "campaign_audience":
        query = ("SELECT c.tenant_id::text FROM campaign_audience AS a"
                 " JOIN contacts AS c ON c.id OPERATOR(pg_catalog.=) a.contact_id")
    else:
        query = f"SELECT tenant_id::text FROM {table}"
    return {r[0] for r in hostile.execute(query)}


@pytest.mark.parametrize("table", TENANT_TABLES)
@pytest.mark.parametrize("role", ["app", "reader"])
def test_shadowed_operators_do_not_open_other_tenants_rows(conn, login, two_tenants, role, table):
    a = two_tenants["A"]["seed"].tenant_id
    hostile = login(role)
    scoped(hostile, a)
    assert visible_tenants(hostile, table) == {str(a)}
    assert evil_calls(hostile) == 0, hostile.execute("SELECT what, count(*) FROM calls GROUP BY 1").fetchall()


def test_shadowed_operators_do_not_let_writes_reach_other_tenants(conn, login, two_tenants):
    b = two_tenants["B"]["seed"].tenant_id
    before = digests(conn, b)
    hostile = login("app")
    scoped(hostile, two_tenants["A"]["seed"].tenant_id)
    hostile.execute("UPDATE campaigns SET name = 'pwned'")
    hostile.execute("UPDATE contacts SET email = 'pwned@example.com'")
    hostile.execute("UPDATE provider_configs SET settings = '{}'")
    hostile.execute("DELETE FROM campaign_audience")
    assert digests(conn, b) == before
    assert scalar(conn, "SELECT count(*) FROM campaigns WHERE name = 'pwned'") == 2  # A's own two
    assert evil_calls(hostile) == 0


def test_a_tenant_scoped_outbox_query_is_an_index_scan_with_the_predicate_inlined(conn, login, two_tenants):
    a = two_tenants["A"]
    hostile = login("reader", evil=False)
    scoped(hostile, a["seed"].tenant_id)
    # A table this small may be read whole once autovacuum analysed it (the embedded server's
    # did, in one run): without that option, only a predicate that keeps the index from being
    # used would still give a sequential scan.
    hostile.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in hostile.execute(
        "EXPLAIN SELECT * FROM channel_outbox WHERE run_id = %s", [a["run"]]))
    assert "Index Scan using channel_outbox_by_run_idx" in plan, plan
    assert "in_scope" not in plan and "current_setting('execution_kernel.tenant_id'" in plan, plan


# --- every SECURITY DEFINER function, called with the look-alikes in place --------------------

# (role, query, expected SQLSTATE or None); {B_*} are tenant B's ids, {job} a job another worker holds.
DEFINER_CALLS = {
    "check_campaign_launch_prerequisites(uuid,uuid)":
        ("app", "SELECT * FROM check_campaign_launch_prerequisites('{B_campaign}', '{B_workspace}')", None),
    "deploy_campaign(uuid)": ("app", "SELECT deploy_campaign('{B_queued_campaign}')", "KE002"),
    "deploy_campaign(uuid,integer)": ("app", "SELECT deploy_campaign('{B_queued_campaign}', 5)", "KE002"),
    "deploy_campaign(uuid,timestamptz,integer,timestamptz,integer)":
        ("app", "SELECT deploy_campaign('{B_queued_campaign}', now() + interval '1 day', 5)", "KE002"),
    "retry_campaign_run(uuid)": ("app", "SELECT retry_campaign_run('{B_run}')", "KE002"),
    "retry_campaign_run(uuid,boolean)": ("app", "SELECT retry_campaign_run('{B_run}', true)", "KE002"),
    "cancel_campaign_run(uuid)": ("app", "SELECT cancel_campaign_run('{B_queued_run}')", "KE002"),
    "run_details(uuid)": ("reader", "SELECT run_details('{B_run}')", "KE002"),
    "run_details(uuid,integer)": ("reader", "SELECT run_details('{B_run}', 10)", "KE002"),
    "run_items(uuid,text,uuid,integer)": ("reader", "SELECT * FROM run_items('{B_run}')", "KE002"),
    "queue_stats()": ("reader", "SELECT * FROM queue_stats()", None),
    "claim_queued_jobs(text,integer)": ("worker", "SELECT * FROM claim_queued_jobs('intruder', 0)", "KE008"),
    "heartbeat_job(uuid,text)": ("worker", "SELECT heartbeat_job('{job}', 'intruder')", "KE005"),
    "release_job(uuid,text,text)": ("worker", "SELECT release_job('{job}', 'intruder', 'x')", "KE005"),
    "job_context(uuid,text)": ("worker", "SELECT job_context('{job}', 'intruder')", "KE005"),
    "recover_dispatched_items(uuid,text,boolean)":
        ("worker", "SELECT recover_dispatched_items('{job}', 'intruder', false)", "KE005"),
    "reserve_outbox_items(uuid,text,integer)":
        ("worker", "SELECT * FROM reserve_outbox_items('{job}', 'intruder', 5)", "KE005"),
    "mark_outbox_dispatched(uuid,text,uuid[])":
        ("worker", "SELECT mark_outbox_dispatched('{job}', 'intruder', ARRAY['{item}']::uuid[])", "KE005"),
    "record_outbox_results(uuid,text,jsonb)":
        ("worker", "SELECT record_outbox_results('{job}', 'intruder', '[]')", "KE005"),
    "complete_job(uuid,boolean,text,text)": ("worker", "SELECT complete_job('{job}', false, 'x', NULL)", "KE008"),
    "complete_job(uuid,boolean,text)": ("worker", "SELECT complete_job('{job}', false, 'x')", "KE013"),
    "take_rate_tokens(uuid,text,integer)": ("worker", "SELECT take_rate_tokens('{B_workspace}', 'none', 1)", None),
    "worker_step(text,numeric,uuid[],uuid[],text[],text[],text[],text[],uuid[],uuid[],text[],uuid[],integer,integer,text[],uuid)": (  # noqa: E501 - the signature whole, as the catalog spells it
        "worker",
        "SELECT * FROM worker_step('intruder', 30, ARRAY['{job}']::uuid[], ARRAY['{item}']::uuid[],"
        " ARRAY['sent'], ARRAY['p'], ARRAY[NULL], ARRAY[NULL], ARRAY['{job}']::uuid[], ARRAY['{job}']::uuid[],"
        " ARRAY['x'], '{{}}', 0, 0, '{{}}', NULL::uuid)",
        None,
    ),
    "worker_step(text,numeric,uuid[],uuid[],text[],text[],text[],text[],uuid[],uuid[],text[],uuid[],integer,integer,text[],uuid[])": (  # noqa: E501 - the signature whole, as the catalog spells it
        "worker",
        "SELECT * FROM worker_step('intruder', 30, ARRAY['{job}']::uuid[], ARRAY['{item}']::uuid[],"
        " ARRAY['sent'], ARRAY['p'], ARRAY[NULL], ARRAY[NULL], ARRAY['{job}']::uuid[], ARRAY['{job}']::uuid[],"
        " ARRAY['x'], '{{}}', 0, 0, '{{}}', NULL::uuid[])",
        None,
    ),
    "release_jobs(text,uuid[],text,uuid[])": (
        "worker", "SELECT release_jobs('intruder', ARRAY['{job}']::uuid[], 'x')", None),
    "undispatch_items(text,uuid[],uuid[],uuid[])": (
        "worker", "SELECT * FROM undispatch_items('intruder', ARRAY['{job}']::uuid[], '{{}}'::uuid[])", None),
}


def test_every_security_definer_function_is_in_the_hostile_calls(conn, kernel_schema):
    signatures = set()
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        for row in conn.execute(
            "SELECT p.proname || '(' || coalesce(string_agg(format_type(t, NULL), ',' ORDER BY n), '') || ')'"
            " FROM pg_proc AS p LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a (t, n) ON true"
            " WHERE p.pronamespace = %s::regnamespace AND p.prosecdef AND p.prorettype <> 'trigger'::regtype"
            " GROUP BY p.oid, p.proname",
            [kernel_schema],
        ):
            signatures.add(row[0].replace("timestamp with time zone", "timestamptz"))
    assert signatures == set(DEFINER_CALLS)


def test_security_definer_functions_never_call_the_look_alikes(conn, login, two_tenants):
    a, b = two_tenants["A"], two_tenants["B"]
    held = claim_one(conn, "holder")  # B's or A's queued job, held by another worker
    [item] = reserve(conn, held["id"], "holder", 1)[:1]
    ids = {
        "B_campaign": b["seed"].campaign_id, "B_workspace": b["seed"].workspace_id,
        "B_queued_campaign": b["queued"].campaign_id, "B_run": b["run"], "B_queued_run": b["queued_run"],
        "job": held["id"], "item": item["id"],
    }
    hostiles = {role: login(role) for role in ("app", "reader", "worker")}
    for role in ("app", "reader"):
        scoped(hostiles[role], a["seed"].tenant_id)
    before = digests(conn)
    for name, (role, query, sqlstate) in DEFINER_CALLS.items():
        hostile = hostiles[role]
        statement = query.format(**ids)
        if sqlstate is None:
            found = hostile.execute(statement).fetchall()
            if name.startswith("check_campaign"):  # B's campaign looks missing: only the first check, failed
                assert [(r[0], r[1]) for r in found] == [("campaign_exists", False)], found
            if name.startswith("worker_step"):
                assert [r[0] for r in found] == ["lost"], found
        else:
            with raises(sqlstate, case=name):
                hostile.execute(statement)
        assert evil_calls(hostile) == 0, name
    after = digests(conn)
    # Only take_rate_tokens may write (a bucket for a provider nobody limits: none).
    assert after == before
    assert scalar(conn, "SELECT locked_by FROM job_queue WHERE id = %s", [held["id"]]) == "holder"


# --- 2. a workspace belongs to one tenant -------------------------------------------------------


def host_inserts(workspace: uuid.UUID, tenant: str) -> dict[str, tuple[str, list]]:
    columns = "" if tenant == "omitted" else "tenant_id, "
    value = [] if tenant == "omitted" else [tenant]
    marks = "" if tenant == "omitted" else "%s, "
    return {
        "campaigns": (f"INSERT INTO campaigns ({columns}workspace_id, name, channel) VALUES ({marks}%s, 'x', 'email')",
                      [*value, workspace]),
        "contacts": (f"INSERT INTO contacts ({columns}workspace_id, email) VALUES ({marks}%s, 'x@example.com')",
                     [*value, workspace]),
        "provider_configs(email)": (
            f"INSERT INTO provider_configs ({columns}workspace_id, channel, provider)"
            f" VALUES ({marks}%s, 'email', 'smtp')",
            [*value, workspace]),
        "provider_configs(voice)": (
            f"INSERT INTO provider_configs ({columns}workspace_id, channel, provider)"
            f" VALUES ({marks}%s, 'voice', 'twilio')",
            [*value, workspace]),
    }


def shape(error: psycopg.Error, *ids: object) -> tuple[str | None, str]:
    message = error.diag.message_primary or ""
    for ident in ids:
        message = message.replace(str(ident), "<id>")
    return error.diag.sqlstate, message


def test_another_tenants_workspace_cannot_be_named_and_reveals_nothing(conn, login, two_tenants):
    a, b = two_tenants["A"]["seed"], two_tenants["B"]["seed"]
    c = seed_campaign(conn, 1, provider=None)  # a third tenant's workspace, with no provider config
    before = digests(conn)
    hostile = login("app")
    scoped(hostile, a.tenant_id)
    seen = set()
    for tenant in ("omitted", str(a.tenant_id), str(b.tenant_id)):
        for target in (b, c):
            for table, (query, params) in host_inserts(target.workspace_id, tenant).items():
                with raises("KE002", target.workspace_id, case=f"{table} as {tenant}") as caught:
                    hostile.execute(query, params)
                seen.add(shape(caught.value, target.workspace_id))
    # B has an e-mail config and C none, B a campaign and C one too: the answers do not differ.
    assert seen == {("KE002", "workspace <id> not found")}
    own = scalar(hostile, "INSERT INTO provider_configs (workspace_id, channel, provider) VALUES (%s, 'voice',"
                          " 'twilio') RETURNING workspace_id", [a.workspace_id])
    with raises("KE002", b.workspace_id):
        hostile.execute("UPDATE provider_configs SET workspace_id = %s WHERE workspace_id = %s",
                        [b.workspace_id, own])
    with raises("KE008"):  # a contact never moves
        hostile.execute("UPDATE contacts SET workspace_id = %s WHERE id = %s", [b.workspace_id, a.contact_ids[0]])
    conn.execute("DELETE FROM provider_configs WHERE workspace_id = %s AND channel = 'voice'", [a.workspace_id])
    assert digests(conn) == before
    assert evil_calls(hostile) == 0
    # B can still configure the channel A tried to take, and its rate limit is its own.
    conn.execute("INSERT INTO provider_configs (tenant_id, workspace_id, channel, provider, max_per_second)"
                 " VALUES (%s, %s, 'voice', 'twilio', 7)", [b.tenant_id, b.workspace_id])
    assert scalar(conn, "SELECT count(*) FROM provider_configs WHERE workspace_id = %s", [b.workspace_id]) == 2


def test_audience_rows_naming_another_tenants_campaign_or_contact_look_missing(conn, login, two_tenants):
    a, b = two_tenants["A"]["seed"], two_tenants["B"]["seed"]
    before = digests(conn)
    hostile = login("app")
    scoped(hostile, a.tenant_id)
    pairs = {
        "their campaign": (b.campaign_id, a.contact_ids[0], b.campaign_id),
        "their contact": (a.campaign_id, b.contact_ids[0], b.contact_ids[0]),
        "their existing pair": (b.campaign_id, b.contact_ids[0], b.campaign_id),
        "no such campaign": (uuid.uuid4(), a.contact_ids[0], None),
        "no such contact": (a.campaign_id, uuid.uuid4(), None),
    }
    seen = {}
    for case, (campaign, contact, named) in pairs.items():
        named = named or (campaign if case == "no such campaign" else contact)
        with raises("KE002", named, case=case) as caught:
            hostile.execute("INSERT INTO campaign_audience VALUES (%s, %s)", [campaign, contact])
        seen[case] = shape(caught.value, named)
    assert seen["their campaign"] == seen["their existing pair"] == seen["no such campaign"]
    assert seen["their contact"] == seen["no such contact"]
    with raises("KE002", b.campaign_id):
        hostile.execute("UPDATE campaign_audience SET campaign_id = %s WHERE campaign_id = %s",
                        [b.campaign_id, a.campaign_id])
    assert digests(conn) == before


def test_workspaces_are_registered_to_the_first_tenant_that_names_them(conn):
    seed = seed_campaign(conn, 1)
    assert rows(conn, "SELECT id, tenant_id FROM workspaces") == [
        {"id": seed.workspace_id, "tenant_id": seed.tenant_id}
    ]
    with raises("KE002", seed.workspace_id):  # even the owner role keeps the rule
        conn.execute("INSERT INTO contacts (tenant_id, workspace_id) VALUES (%s, %s)",
                     [uuid.uuid4(), seed.workspace_id])
    with raises("KE008"):
        conn.execute("INSERT INTO contacts (workspace_id) VALUES (%s)", [uuid.uuid4()])  # no tenant, no scope


# --- 3. a worker can end only a job it holds --------------------------------------------------


def test_a_worker_cannot_complete_a_job_another_worker_holds(conn, login):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    holder, intruder = login("worker", evil=False), login("worker", evil=False)
    held = claim_one(holder, "holder")
    reserve(holder, held["id"], "holder", 1)
    before = digests(conn)
    with raises("KE008", "worker"):
        intruder.execute("SELECT complete_job(%s, false, 'x', NULL)", [held["id"]])
    with raises("KE013", "operator"):  # the seed's form without a worker id is an operator's
        intruder.execute("SELECT complete_job(%s, false, 'x')", [held["id"]])
    intruder.execute("SET execution_kernel.worker_id = 'intruder'")
    with raises("KE005", "intruder"):
        intruder.execute("SELECT complete_job(%s, false, 'x')", [held["id"]])
    for query in ("SELECT * FROM worker_step(NULL, 30, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',"
                  " 0, 0, '{}', NULL::uuid[])",
                  "SELECT release_jobs(NULL, ARRAY[%s]::uuid[], 'x')"):
        with raises("KE008", "worker"):
            intruder.execute(query, [held["id"]] if "%s" in query else None)
    assert digests(conn) == before
    assert scalar(conn, "SELECT status FROM campaign_runs WHERE id = %s", [run_id]) == "running"


def test_an_operator_may_end_a_stuck_job(conn, login):
    seed = seed_campaign(conn, 2)
    run_id = deploy(conn, seed.campaign_id)
    held = claim_one(conn, "vanished")
    operator = login("operator", evil=False)
    with raises("KE007"):  # success needs every contact reached
        operator.execute("SELECT complete_job(%s, true, NULL)", [held["id"]])
    operator.execute("SELECT complete_job(%s, false, 'ended by the operator')", [held["id"]])
    assert scalar(conn, "SELECT status FROM job_queue WHERE id = %s", [held["id"]]) == "failed"
    assert scalar(conn, "SELECT status FROM campaign_runs WHERE id = %s", [run_id]) == "failed"
    assert scalar(conn, "SELECT count(*) FROM channel_outbox WHERE job_id = %s AND status = 'failed'",
                  [held["id"]]) == 2
    # The operator reads every tenant, unscoped.
    assert scalar(operator, "SELECT count(*) FROM campaign_runs") == 1


# --- 4. scoping lives in the transaction --------------------------------------------------------


def test_kernel_scope_lasts_for_the_transaction_only(conn, login, two_tenants):
    a = two_tenants["A"]["seed"]
    app = login("app", evil=False)
    with app.transaction():
        assert scalar(app, "SELECT scope(%s)", [a.tenant_id]) == a.tenant_id
        assert visible_tenants(app, "campaigns") == {str(a.tenant_id)}
    assert visible_tenants(app, "campaigns") == set()
    with app.transaction():
        app.execute("SELECT scope(%s, %s)", [a.tenant_id, uuid.uuid4()])  # a workspace narrows it
        assert visible_tenants(app, "campaigns") == set()
    with raises("KE008", "tenant_id"):
        app.execute("SELECT scope(NULL)")
    with raises("KE009"):  # and after the transaction the kernel asks for a scope again
        app.execute("SELECT deploy_campaign(%s)", [a.campaign_id])

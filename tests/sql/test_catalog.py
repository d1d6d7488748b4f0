"""Catalog hygiene: comments, pinned search_path, no PUBLIC execute, RLS, seed signatures."""

from __future__ import annotations

# Tables holding tenant rows (or per-workspace state): row-level security must be on.
TENANT_TABLES = [
    "campaigns", "contacts", "campaign_audience", "provider_configs", "campaign_runs",
    "job_queue", "channel_outbox", "job_events", "rate_buckets",
]

SEED_SIGNATURES = [
    # (identity arguments, result) as pg_get_function_identity_arguments/_result print them
    ("deploy_campaign", "p_campaign_id uuid", "uuid"),
    ("claim_queued_jobs", "p_worker text, p_max_jobs integer", "SETOF {schema}.job_queue"),
    ("complete_job", "p_job_id uuid, p_success boolean, p_error text", "void"),
    (
        "check_campaign_launch_prerequisites",
        "p_campaign_id uuid, p_workspace_id uuid",
        "TABLE(check_name text, passed boolean, detail text)",
    ),
]

CONTRACT_FUNCTIONS = [
    "deploy_campaign(uuid, integer)",
    "claim_queued_jobs(text, integer)",
    "heartbeat_job(uuid, text)",
    "release_job(uuid, text, text)",
    "recover_dispatched_items(uuid, text, boolean)",
    "reserve_outbox_items(uuid, text, integer)",
    "mark_outbox_dispatched(uuid, text, uuid[])",
    "record_outbox_results(uuid, text, jsonb)",
    "complete_job(uuid, boolean, text, text)",
    "cancel_campaign_run(uuid)",
    "retry_campaign_run(uuid)",
    "retry_campaign_run(uuid, boolean)",
    "run_details(uuid)",
    "run_details(uuid, integer)",
    "take_rate_tokens(uuid, text, integer)",
    "queue_stats()",
    "kernel_version()",
]


def names(conn, query, schema):
    return sorted(r[0] for r in conn.execute(query, [schema]))


def functions_where(conn, schema, condition):
    """The schema's functions (as regprocedure text) for which ``condition`` on ``p`` holds."""
    return names(
        conn,
        "SELECT p.oid::regprocedure::text FROM pg_proc AS p"
        f" WHERE p.pronamespace = %s::regnamespace AND ({condition})",
        schema,
    )


def test_every_table_has_a_comment(conn, kernel_schema):
    missing = names(
        conn,
        "SELECT c.relname FROM pg_class AS c WHERE c.relnamespace = %s::regnamespace"
        " AND c.relkind IN ('r', 'p', 'v', 'm') AND obj_description(c.oid, 'pg_class') IS NULL",
        kernel_schema,
    )
    assert missing == []


def test_every_function_has_a_comment(conn, kernel_schema):
    assert functions_where(conn, kernel_schema, "obj_description(p.oid, 'pg_proc') IS NULL") == []


def test_security_definer_functions_pin_search_path(conn, kernel_schema):
    assert len(functions_where(conn, kernel_schema, "p.prosecdef")) >= 15
    unpinned = functions_where(
        conn, kernel_schema,
        "p.prosecdef AND NOT EXISTS ("
        " SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%%')",
    )
    assert unpinned == []


def test_every_function_resolves_names_without_the_callers_search_path(conn, kernel_schema):
    """Pinned search_path, or a SQL-standard body (bound at creation; what the RLS predicates
    use so that they stay inlinable): a caller's schema can shadow nothing inside either."""
    unbound = functions_where(
        conn, kernel_schema,
        "p.prosqlbody IS NULL AND NOT EXISTS ("
        " SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%%')",
    )
    assert unbound == []
    bound = functions_where(conn, kernel_schema, "p.prosqlbody IS NOT NULL")
    assert sorted(f.split("(")[0].split(".")[-1] for f in bound) == [
        "clock", "current_tenant", "current_workspace", "in_scope", "is_time_zone"]


def test_no_function_is_executable_by_public(conn, kernel_schema):
    # A NULL proacl means the default privileges, which include EXECUTE for PUBLIC.
    public = functions_where(
        conn, kernel_schema,
        "p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a"
        " WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')",
    )
    assert public == []


def test_security_definer_functions_are_owned_by_the_owner_role(conn, kernel_schema):
    owners = names(
        conn,
        "SELECT DISTINCT pg_get_userbyid(p.proowner)::text FROM pg_proc AS p"
        " WHERE p.pronamespace = %s::regnamespace AND p.prosecdef",
        kernel_schema,
    )
    assert owners == [f"{kernel_schema}_owner"]
    assert not conn.execute(
        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", [f"{kernel_schema}_owner"]
    ).fetchone()[0]


def test_row_level_security_is_enabled_on_tenant_tables(conn, kernel_schema):
    without = [
        t for t in TENANT_TABLES
        if conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass",
                        [f"{kernel_schema}.{t}"]).fetchone() != (True,)
    ]
    assert without == []


def test_every_table_has_row_level_security(conn, kernel_schema):
    without = names(
        conn,
        "SELECT relname::text FROM pg_class WHERE relnamespace = %s::regnamespace"
        " AND relkind IN ('r', 'p') AND NOT relrowsecurity",
        kernel_schema,
    )
    assert without == []


def test_seed_signatures(conn, kernel_schema):
    missing = []
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")  # so that types print schema-qualified
        for name, args, result in SEED_SIGNATURES:
            found = conn.execute(
                "SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid)"
                " FROM pg_proc AS p WHERE p.pronamespace = %s::regnamespace AND p.proname = %s",
                [kernel_schema, name],
            ).fetchall()
            if (args, result.format(schema=kernel_schema)) not in found:
                missing.append((name, found))
    assert missing == []


def test_contract_functions_exist(conn, kernel_schema):
    missing = [
        f for f in CONTRACT_FUNCTIONS
        if conn.execute("SELECT to_regprocedure(%s) IS NULL", [f"{kernel_schema}.{f}"]).fetchone()[0]
    ]
    assert missing == []

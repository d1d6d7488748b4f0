"""Hostile and odd arguments, generated (hypothesis), for every public function of the kernel,
called as an application scoped to tenant B and as a daemon that holds no lease: NULLs, unknown
ids, tenant A's ids, huge and odd strings, JSON of any shape, extreme numbers and times.
Whatever the call, it either works or is refused with one of the kernel's SQLSTATEs (class KE)
or a documented data error; and it never changes a row of tenant A (as B), nor a job another
daemon holds (as the daemon). Examples: tests/sql/test_arguments.py, test_hostile.py."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.integration.daemon import login_role
from tests.sql.helpers import KERNEL_TABLES, claim_one, deploy, reserve, run_job, seed_campaign

# What PostgreSQL itself may answer to an argument of the right type but an impossible value,
# before any kernel code runs or where the kernel passes it to a built-in (a time zone name,
# an interval): each says what was wrong. Anything else is a defect (a crash, or a kernel error
# that is not in the contract).
DATA_ERRORS = {
    "22008",  # datetime_field_overflow: a time so far off the lease or window arithmetic cannot hold it
    "22023",  # invalid_parameter_value: an unknown time zone (is_time_zone's documented answer)
}

ROLES = ("app", "worker")


def public_functions(conn: psycopg.Connection, schema: str, role: str) -> list[tuple[str, list[str]]]:
    rows = conn.execute(
        "SELECT p.proname, array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) AS t)"
        " FROM pg_proc AS p WHERE p.pronamespace = %s::regnamespace AND p.prorettype <> 'trigger'::regtype"
        " AND has_function_privilege(%s, p.oid, 'EXECUTE') AND p.proname NOT LIKE '\\_%%'"
        " ORDER BY 1, 2", [schema, f"{schema}_{role}"]).fetchall()
    return [(name, list(types)) for name, types in rows]


@pytest.fixture
def world(conn):
    """Tenants A and B: each a finished run with a failed item, and a job held by its own
    daemon with two items reserved."""
    found: dict[str, dict[str, Any]] = {}
    for name in ("A", "B"):
        seed = seed_campaign(conn, 3)
        finished = deploy(conn, seed.campaign_id)
        run_job(conn, claim_one(conn, f"w-{name}")["id"], f"w-{name}", "failed")
        live = seed_campaign(conn, 4, tenant_id=seed.tenant_id, workspace_id=seed.workspace_id)
        live_run = deploy(conn, live.campaign_id)
        job = claim_one(conn, f"w-{name}")
        items = [i["id"] for i in reserve(conn, job["id"], f"w-{name}", 2)]
        found[name] = {"tenant": seed.tenant_id, "workspace": seed.workspace_id, "campaign": seed.campaign_id,
                       "run": finished, "live_run": live_run, "job": job["id"], "items": items}
    return found


def tenant_fingerprint(conn: psycopg.Connection, tenant: uuid.UUID) -> str:
    digest = hashlib.sha256()
    for table in KERNEL_TABLES:
        for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} AS t WHERE tenant_id = %s ORDER BY 1").format(
                sql.Identifier(table)), [tenant]):
            digest.update(row.encode())
    return digest.hexdigest()


def held_fingerprint(conn: psycopg.Connection, jobs: list[uuid.UUID]) -> str:
    rows = conn.execute(
        "SELECT (SELECT string_agg(j::text, '|' ORDER BY j.id) FROM job_queue AS j WHERE j.id = ANY(%s)),"
        " (SELECT string_agg(o::text, '|' ORDER BY o.id) FROM channel_outbox AS o WHERE o.job_id = ANY(%s))",
        [jobs, jobs]).fetchone()
    return repr(rows)


ODD_TEXT = st.one_of(
    st.none(), st.just(""), st.just("w-evil"), st.just("x" * 100_000), st.just("'; DROP TABLE job_queue; --"),
    st.just("Europe/Nowhere"), st.just("sent"), st.just("email"), st.just("smtp"), st.just("ünïcödé ✉ 💥"),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=50),
)
ODD_INT = st.one_of(st.none(), st.sampled_from([-(2**31), -1, 0, 1, 2, 5, 1000, 10_001, 2**31 - 1]))
ODD_TIME = st.one_of(st.none(), st.sampled_from([
    datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC),
    datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)]))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
              st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["id", "outcome", "start", "end", "host", "port", "x"]),
                                            inner, max_size=4)),
    max_leaves=12,
)


def values(kind: str, ids: list[uuid.UUID]) -> st.SearchStrategy[Any]:
    uuids = st.one_of(st.none(), st.uuids(), st.sampled_from(ids))
    return {
        "uuid": uuids,
        "uuid[]": st.one_of(st.none(), st.lists(st.one_of(st.uuids(), st.sampled_from(ids)), max_size=4)),
        "text": ODD_TEXT,
        "text[]": st.one_of(st.none(), st.lists(ODD_TEXT.filter(lambda t: t is not None), max_size=3)),
        "integer": ODD_INT,
        "numeric": st.one_of(st.none(), st.sampled_from([-1, 0, 0.001, 30, 1e9])),
        "boolean": st.one_of(st.none(), st.booleans()),
        "jsonb": st.one_of(st.none(), JSON.map(Jsonb),
                           st.builds(lambda i, o: Jsonb([{"id": str(i), "outcome": o}]), st.sampled_from(ids),
                                     st.sampled_from(["sent", "failed", "unknown", "retry", "lost"]))),
        "timestamp with time zone": ODD_TIME,
    }[kind]


@pytest.mark.parametrize("role", ROLES)
def test_any_argument_is_answered_or_refused_and_touches_no_one_else(conn, kernel_schema, world, role):
    a, b = world["A"], world["B"]
    ids = [value for tenant in (a, b) for key, value in tenant.items() if key != "items"] + a["items"] + b["items"]
    functions = public_functions(conn, kernel_schema, role)
    assert len(functions) > 10
    kinds = {kind for _, types in functions for kind in types}
    strategies = {kind: values(kind, ids) for kind in kinds}  # a type without a strategy fails here
    with login_role(conn, kernel_schema, role) as user:
        caller = psycopg.connect(conn.info.dsn, user=user, autocommit=True)
        try:
            caller.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(kernel_schema)))
            guarded = (lambda: tenant_fingerprint(conn, a["tenant"])) if role == "app" else (
                lambda: held_fingerprint(conn, [a["job"], b["job"]]))
            before = guarded()
            seen: dict[str, set[str]] = {}

            @settings(max_examples=300, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
            @given(st.data())
            def call(data: st.DataObject) -> None:
                name, types = data.draw(st.sampled_from(functions))
                args = [data.draw(strategies[kind]) for kind in types]
                statement = sql.SQL("SELECT * FROM {}({})").format(
                    sql.Identifier(name), sql.SQL(", ").join(sql.SQL("%s::" + kind) for kind in types))
                try:
                    with caller.transaction():
                        if role == "app":
                            caller.execute("SELECT scope(%s)", [b["tenant"]])
                        caller.execute(statement, args).fetchall()
                    outcome = "ok"
                except psycopg.Error as exc:
                    outcome = exc.diag.sqlstate or "?"
                    assert outcome.startswith("KE") or outcome in DATA_ERRORS, (name, args, outcome, str(exc))
                seen.setdefault(name, set()).add(outcome)
                assert guarded() == before, (name, args, "changed rows it must not")

            call()
        finally:
            caller.close()
    assert len(seen) >= len(functions) // 2, seen  # the draws reached most functions


def test_an_application_asking_about_a_setting_of_the_wrong_type_gets_the_problem(conn, kernel_schema):
    """What the generated calls found: this answered 42501 (a private function it calls was the
    owner's alone) until 1.6."""
    with login_role(conn, kernel_schema, "app") as user, psycopg.connect(conn.info.dsn, user=user) as app:
        problems = app.execute(sql.SQL("SELECT {}.provider_settings_problems('smtp', 'email', %s)").format(
            sql.Identifier(kernel_schema)), [Jsonb({"host": False, "port": "25"})]).fetchone()[0]
    assert any("host" in problem for problem in problems), problems

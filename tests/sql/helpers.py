"""Seeding and small tools for the SQL-level kernel tests (tests/sql).

Everything here talks SQL to a connection from the ``conn``/``connect`` fixtures of
tests/conftest.py (autocommit, superuser, kernel schema first on the search_path), so the
kernel functions are called unqualified. Seeds are plain INSERTs into the host tables.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

EMAIL_CONTENT = {"subject": "Spring sale", "text": "Everything must go."}
VOICE_CONTENT = {"from": "+15550000000", "script": "Hello, this is a reminder."}
CONTENT = {"email": EMAIL_CONTENT, "voice": VOICE_CONTENT}
DEFAULT_PROVIDER = {"email": "smtp", "voice": "twilio"}
SETTINGS = {
    "smtp": {"host": "smtp.example.com", "port": 587, "from": "news@example.com", "starttls": True},
    "twilio": {
        "base_url": "https://api.twilio.example",
        "account_sid": "AC123",
        "auth_token_env": "TWILIO_TOKEN",
        "from": "+15550000001",
    },
    "webhook": {"url": "https://hooks.example.com/send"},
}

# Kernel tables whose content proves "nothing was written".
KERNEL_TABLES = ("campaign_runs", "job_queue", "channel_outbox", "job_events", "rate_buckets", "job_item_counts")

LAUNCH_CHECKS = [
    "campaign_exists",
    "channel_supported",
    "content_complete",
    "audience_not_empty",
    "reachable_contacts",
    "provider_configured",
    "provider_settings_valid",
    "no_active_run",
]


@dataclass
class Seed:
    tenant_id: uuid.UUID
    workspace_id: uuid.UUID
    campaign_id: uuid.UUID
    contact_ids: list[uuid.UUID]  # sorted, the order deploy_campaign batches them in
    channel: str


def seed_campaign(
    conn: psycopg.Connection,
    contacts: int = 3,
    *,
    channel: str = "email",
    content: dict[str, Any] | None = None,
    unsubscribed_every: int = 0,
    no_address_every: int = 0,
    provider: str | None = "default",
    settings: dict[str, Any] | None = None,
    max_per_second: float | None = None,
    tenant_id: uuid.UUID | None = None,
    workspace_id: uuid.UUID | None = None,
) -> Seed:
    """A campaign with ``contacts`` contacts in its audience and (unless ``provider`` is None)
    a provider config for its channel. Every ``unsubscribed_every``-th contact is unsubscribed,
    every ``no_address_every``-th has neither e-mail nor phone."""
    tenant_id = tenant_id or uuid.uuid4()
    workspace_id = workspace_id or uuid.uuid4()
    content = CONTENT.get(channel, {}) if content is None else content
    campaign_id = scalar(
        conn,
        "INSERT INTO campaigns (tenant_id, workspace_id, name, channel, content)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        [tenant_id, workspace_id, f"campaign {channel}", channel, json.dumps(content)],
    )
    contact_ids = add_contacts(
        conn, campaign_id, contacts,
        unsubscribed_every=unsubscribed_every, no_address_every=no_address_every,
    )
    if provider is not None:
        provider = DEFAULT_PROVIDER.get(channel, "webhook") if provider == "default" else provider
        conn.execute(
            "INSERT INTO provider_configs (workspace_id, channel, provider, settings, tenant_id,"
            " max_per_second) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (workspace_id, channel, tenant_id) DO NOTHING",
            [workspace_id, channel, provider,
             json.dumps(SETTINGS.get(provider, {}) if settings is None else settings),
             tenant_id, max_per_second],
        )
    return Seed(tenant_id, workspace_id, campaign_id, sorted(contact_ids), channel)


def add_contacts(
    conn: psycopg.Connection,
    campaign_id: uuid.UUID,
    count: int,
    *,
    unsubscribed_every: int = 0,
    no_address_every: int = 0,
) -> list[uuid.UUID]:
    """Insert ``count`` contacts in the campaign's tenant and workspace, add them to its audience."""
    if count == 0:
        return []
    rows = conn.execute(
        """
        INSERT INTO contacts (tenant_id, workspace_id, email, phone, unsubscribed)
        SELECT c.tenant_id, c.workspace_id,
               CASE WHEN %(na)s > 0 AND g %% %(na)s = 0 THEN NULL ELSE 'c' || g || '@example.com' END,
               CASE WHEN %(na)s > 0 AND g %% %(na)s = 0 THEN NULL ELSE '+1555' || lpad(g::text, 7, '0') END,
               %(un)s > 0 AND g %% %(un)s = 0
        FROM campaigns AS c, generate_series(1, %(n)s) AS g
        WHERE c.id = %(campaign)s
        ORDER BY g
        RETURNING id
        """,
        {"campaign": campaign_id, "n": count, "un": unsubscribed_every, "na": no_address_every},
    ).fetchall()
    ids = [r[0] for r in rows]
    conn.execute(
        "INSERT INTO campaign_audience (campaign_id, contact_id) SELECT %s, unnest(%s::uuid[])",
        [campaign_id, ids],
    )
    return ids


# --- plain SQL --------------------------------------------------------------------------


def scalar(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def one(conn: psycopg.Connection, query: str, params: Any = None) -> dict[str, Any]:
    found = rows(conn, query, params)
    assert len(found) == 1, f"expected one row, got {len(found)}: {query}"
    return found[0]


def run_row(conn: psycopg.Connection, run_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM campaign_runs WHERE id = %s", [run_id])


def job_row(conn: psycopg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM job_queue WHERE id = %s", [job_id])


def item_row(conn: psycopg.Connection, item_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM channel_outbox WHERE id = %s", [item_id])


def jobs_of(conn: psycopg.Connection, run_id: uuid.UUID) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT * FROM job_queue WHERE run_id = %s ORDER BY (payload ->> 'batch_no')::int, id",
        [run_id],
    )


def items_of(conn: psycopg.Connection, column: str, value: Any) -> list[dict[str, Any]]:
    """Outbox rows where ``column`` (run_id, job_id, contact_id, …) equals ``value``."""
    return rows(
        conn,
        sql.SQL("SELECT * FROM channel_outbox WHERE {} = %s ORDER BY created_at, id").format(
            sql.Identifier(column)
        ),
        [value],
    )


def statuses(conn: psycopg.Connection, column: str, value: Any) -> dict[uuid.UUID, str]:
    """contact_id → status of the outbox rows where ``column`` equals ``value``."""
    return {i["contact_id"]: i["status"] for i in items_of(conn, column, value)}


def fingerprint(conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """Row count and digest of every kernel table: equal fingerprints mean nothing was written."""
    found = {}
    for table in KERNEL_TABLES:
        found[table] = conn.execute(
            sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                " FROM {} AS t"
            ).format(sql.Identifier(table))
        ).fetchone()
    return found


@contextlib.contextmanager
def writes_nothing(conn: psycopg.Connection) -> Iterator[None]:
    before = fingerprint(conn)
    yield
    assert fingerprint(conn) == before, "a refused call wrote to the kernel tables"


class Caught:
    """What ``raises`` caught: ``.value`` is the psycopg.Error."""

    value: psycopg.Error


@contextlib.contextmanager
def raises(sqlstate: str, *mentions: Any, case: str = "") -> Iterator[Caught]:
    """Expect a psycopg.Error with ``sqlstate``; its message must mention each of ``mentions``.
    ``case`` names the attempt in failure messages (for loops over many refusals)."""
    caught = Caught()
    where = f"[{case}] " if case else ""
    try:
        yield caught
    except psycopg.Error as exc:
        caught.value = exc
    else:
        pytest.fail(f"{where}no error raised, expected {sqlstate}")
    err = caught.value
    assert err.diag.sqlstate == sqlstate, f"{where}expected {sqlstate}, got {err.diag.sqlstate}: {err}"
    for mention in mentions:
        assert str(mention) in (err.diag.message_primary or ""), (
            f"{where}message does not mention {mention}: {err.diag.message_primary}"
        )


@contextlib.contextmanager
def refused(conn: psycopg.Connection, sqlstate: str, *mentions: Any, case: str = "") -> Iterator[Caught]:
    """``raises`` and ``writes_nothing`` together."""
    with writes_nothing(conn), raises(sqlstate, *mentions, case=case) as caught:
        yield caught


@dataclass
class Explained:
    """One statement as auto_explain logged it."""

    where: str  # the innermost PL/pgSQL function that ran it ("kernel.worker_step line 61 at …"), or "top level"
    plan: str  # auto_explain's message: the duration, then the plan (text or JSON)


@contextlib.contextmanager
def explained(conn: psycopg.Connection, plan_format: str = "text") -> Iterator[list[Explained]]:
    """Every statement run meanwhile, those inside functions too: auto_explain, whose LOG lines
    come to this session as notices. Skips on a server without it (the embedded PostgreSQL of a
    machine with no system one)."""
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        pytest.skip("this PostgreSQL has no auto_explain (contrib)")
    found: list[Explained] = []

    def keep(notice: psycopg.errors.Diagnostic) -> None:
        frames = [line for line in (notice.context or "").splitlines() if line.startswith("PL/pgSQL function")]
        found.append(Explained(frames[0].removeprefix("PL/pgSQL function ") if frames else "top level",
                               notice.message_primary or ""))

    conn.add_notice_handler(keep)
    settings = {"auto_explain.log_min_duration": "0", "auto_explain.log_nested_statements": "on",
                "auto_explain.log_format": plan_format, "client_min_messages": "log"}
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, false)", [name, value])
    try:
        yield found
    finally:
        for name in settings:
            conn.execute(sql.SQL("RESET {}").format(sql.Identifier(*name.split("."))))
        conn.remove_notice_handler(keep)


def set_setting(conn: psycopg.Connection, name: str, value: Any) -> None:
    conn.execute("SELECT set_config(%s, %s, false)", [name, "" if value is None else str(value)])


def set_clock(conn: psycopg.Connection, expression: str | None) -> None:
    """Move kernel.clock() for this session to the value of an SQL expression (None: real time)."""
    if expression is None:
        conn.execute("SELECT set_config('execution_kernel.clock', '', false)")
    else:
        conn.execute(f"SELECT set_config('execution_kernel.clock', ({expression})::timestamptz::text, false)")


@contextlib.contextmanager
def as_role(
    conn: psycopg.Connection,
    schema: str,
    role: str,
    tenant: uuid.UUID | None = None,
    workspace: uuid.UUID | None = None,
) -> Iterator[psycopg.Connection]:
    """Act as ``<schema>_<role>`` (session_user too) scoped to ``tenant``/``workspace``."""
    conn.execute(sql.SQL("SET SESSION AUTHORIZATION {}").format(sql.Identifier(f"{schema}_{role}")))
    set_setting(conn, "execution_kernel.tenant_id", tenant)
    set_setting(conn, "execution_kernel.workspace_id", workspace)
    try:
        yield conn
    finally:
        conn.execute("RESET SESSION AUTHORIZATION")
        set_setting(conn, "execution_kernel.tenant_id", None)
        set_setting(conn, "execution_kernel.workspace_id", None)


# Databases where a test bypassed the triggers: their item counts need not match the items.
TRIGGERS_BYPASSED: set[str] = set()


@contextlib.contextmanager
def triggers_off(conn: psycopg.Connection) -> Iterator[None]:
    """Bypass the guard triggers (superuser only) to put rows into a given state. The counting
    triggers are bypassed too, so the test's end skips the item-count check."""
    TRIGGERS_BYPASSED.add(conn.info.dbname)
    conn.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        conn.execute("SET session_replication_role = DEFAULT")


# --- the kernel's functions -------------------------------------------------------------


def deploy(conn: psycopg.Connection, campaign_id: uuid.UUID, batch_size: int | None = None) -> uuid.UUID:
    if batch_size is None:
        return scalar(conn, "SELECT deploy_campaign(%s)", [campaign_id])
    return scalar(conn, "SELECT deploy_campaign(%s, %s)", [campaign_id, batch_size])


def claim(conn: psycopg.Connection, worker: str = "w1", max_jobs: int = 1) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM claim_queued_jobs(%s, %s)", [worker, max_jobs])


def claim_one(conn: psycopg.Connection, worker: str = "w1") -> dict[str, Any]:
    jobs = claim(conn, worker, 1)
    assert len(jobs) == 1, f"{worker} claimed {len(jobs)} jobs"
    return jobs[0]


def reserve(
    conn: psycopg.Connection, job_id: uuid.UUID, worker: str = "w1", max_items: int = 1000
) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM reserve_outbox_items(%s, %s, %s)", [job_id, worker, max_items])


def dispatch(conn: psycopg.Connection, job_id: uuid.UUID, worker: str, item_ids: Sequence[uuid.UUID]) -> int:
    return scalar(conn, "SELECT mark_outbox_dispatched(%s, %s, %s::uuid[])", [job_id, worker, list(item_ids)])


def result(item_id: uuid.UUID, outcome: str, **extra: Any) -> dict[str, Any]:
    """One element of record_outbox_results' array; sent gets a provider_message_id by default."""
    entry = {"id": str(item_id), "outcome": outcome}
    if outcome == "sent":
        entry["provider_message_id"] = f"msg-{item_id}"
    entry.update(extra)
    return entry


def record(conn: psycopg.Connection, job_id: uuid.UUID, worker: str, results: Any) -> int:
    payload = results if isinstance(results, str) else json.dumps(results)
    return scalar(conn, "SELECT record_outbox_results(%s, %s, %s::jsonb)", [job_id, worker, payload])


def complete(
    conn: psycopg.Connection, job_id: uuid.UUID, worker: str | None = "w1", success: bool = True,
    error: str | None = None,
) -> None:
    if worker is None:
        conn.execute("SELECT complete_job(%s, %s, %s)", [job_id, success, error])
    else:
        conn.execute("SELECT complete_job(%s, %s, %s, %s)", [job_id, success, error, worker])


Outcome = str | Callable[[dict[str, Any]], str]


def send_items(
    conn: psycopg.Connection, job_id: uuid.UUID, worker: str = "w1", outcome: Outcome = "sent"
) -> list[dict[str, Any]]:
    """Reserve every contact of the job, dispatch the pending items and record ``outcome`` for
    each (a string, or a function of the item). Returns the items as reserved."""
    done = []
    while True:
        batch = reserve(conn, job_id, worker, 1000)
        if not batch:
            return done
        dispatch(conn, job_id, worker, [i["id"] for i in batch])
        record(conn, job_id, worker,
               [result(i["id"], outcome(i) if callable(outcome) else outcome) for i in batch])
        done.extend(batch)


def run_job(
    conn: psycopg.Connection,
    job_id: uuid.UUID,
    worker: str = "w1",
    outcome: Outcome = "sent",
    success: bool = True,
) -> list[dict[str, Any]]:
    """Execute a claimed job like the daemon: send every item, then complete the job."""
    items = send_items(conn, job_id, worker, outcome)
    complete(conn, job_id, worker, success)
    return items


def deploy_and_claim(
    conn: psycopg.Connection, contacts: int = 3, worker: str = "w1", **seed_options: Any
) -> tuple[Seed, uuid.UUID, dict[str, Any]]:
    """Seed a campaign, deploy it as one job and claim that job."""
    seed = seed_campaign(conn, contacts, **seed_options)
    run_id = deploy(conn, seed.campaign_id)
    return seed, run_id, claim_one(conn, worker)


def finish_run(conn: psycopg.Connection, campaign_id: uuid.UUID, outcome: Outcome, batch_size: int = 1000) -> uuid.UUID:
    """Deploy and run every job of a campaign to the end with ``outcome`` per item."""
    run_id = deploy(conn, campaign_id, batch_size)
    return drain_run(conn, run_id, outcome)


def drain_run(conn: psycopg.Connection, run_id: uuid.UUID, outcome: Outcome) -> uuid.UUID:
    """Claim and run every job of ``run_id`` (the only queued work in the database)."""
    while jobs := claim(conn, "w1", 100):
        for job in jobs:
            assert job["run_id"] == run_id
            run_job(conn, job["id"], "w1", outcome)
    assert run_row(conn, run_id)["status"] not in ("queued", "running")
    return run_id


def expire_lease(conn: psycopg.Connection, job_id: uuid.UUID) -> None:
    """Make a held lease expire now (instead of sleeping through it)."""
    conn.execute(
        "UPDATE job_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id]
    )


def in_threads(count: int, work: Callable[[int], Any], timeout: float = 60) -> list[Any]:
    """Run ``work(i)`` in ``count`` threads released together by a barrier; returns each result
    or the exception it raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def target(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = work(i)
        except BaseException as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a worker thread hung"
    return results


# --- worker_step ---------------------------------------------------------------------------


def step(conn: psycopg.Connection, worker: str = "w1", *, held: Sequence[Any] = (), results: Sequence[Any] = (),
         complete: Sequence[Any] = (), fail: dict[Any, str] | None = None, redispatch: Sequence[Any] = (),
         want: int = 0, claim: int = 0, deduplicating: Sequence[str] = (), tenant: Any = None,
         lease: float = 30) -> dict[str, list[dict[str, Any]]]:
    """One worker_step (tenant: one, several or None); its rows grouped by kind."""
    results = list(results)
    fail = fail or {}
    found = rows(conn, "SELECT * FROM worker_step(%s::text, %s::numeric, %s::uuid[], %s::uuid[], %s::text[],"
                       " %s::text[], %s::text[], %s::text[], %s::uuid[], %s::uuid[], %s::text[], %s::uuid[],"
                       " %s::integer, %s::integer, %s::text[], %s::uuid[])", [
        worker, lease, list(held), [r[0] for r in results], [r[1] for r in results],
        [r[2] if len(r) > 2 else None for r in results], [None for _ in results],
        [r[3] if len(r) > 3 else None for r in results], list(complete), list(fail), list(fail.values()),
        list(redispatch), want, claim, list(deduplicating),
        None if tenant is None else list(tenant) if isinstance(tenant, list | tuple) else [tenant],
    ])
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in found:
        grouped[row["kind"]].append(row)
    return grouped


def sent(items: Any) -> list[tuple[uuid.UUID, str, str]]:
    return [(item["item_id"], "sent", f"pm-{item['item_id']}") for item in items]


def wrong_item_counts(conn: psycopg.Connection, schema: str) -> list[tuple[Any, ...]]:
    """(job, status, counted, real) wherever kernel.job_item_counts differs from the items
    (tests/conftest.py checks it after every test); empty before 1.6, which has no counts."""
    if conn.execute("SELECT to_regclass(%s) IS NULL", [f"{schema}.job_item_counts"]).fetchone()[0]:
        return []
    return conn.execute(sql.SQL(
        "SELECT job_id, status, coalesce(c.items, 0), coalesce(o.items, 0)"
        " FROM {s}.job_item_counts AS c"
        " FULL JOIN (SELECT job_id, status, count(*) AS items FROM {s}.channel_outbox GROUP BY job_id, status) AS o"
        " USING (job_id, status)"
        " WHERE coalesce(c.items, 0) <> coalesce(o.items, 0)"
    ).format(s=sql.Identifier(schema))).fetchall()


def assert_item_counts_exact(dsn: str, schema: str) -> None:
    """After a test: every job's counts equal its items, unless the test bypassed the triggers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.info.dbname in TRIGGERS_BYPASSED:
            TRIGGERS_BYPASSED.discard(conn.info.dbname)
            return
        wrong = wrong_item_counts(conn, schema)
    assert not wrong, f"job_item_counts differs from the items (job, status, counted, real): {wrong[:10]}"

"""Upgrade a live database from the first released kernel, and roll a bad release back.

Upgrade: work is left in flight on the first release (0001 only) by a worker that "crashed"
(queued and processing jobs, pending items, some dispatched without an outcome, one finished
run), then every migration is applied. Every row must survive, every invariant must hold, and
the current daemon must finish the work exactly as the execution contract says.

Rollback: migrations are append-only, so undoing a bad release is a new forward migration that
restores the previous function definitions (docs/EXECUTION_KERNEL_FREEZE.md, "Rollback process").
Here it is generated from the good release's schema dump and must bring the functions back
exactly.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Json

from kernel_driver import freeze, schema_dump
from kernel_driver.queries import Kernel
from kernel_driver.scaffold import version_sql
from kernel_driver.testing.seed import SeededCampaign, seed_campaign
from kernel_driver.testing.sinks import SmtpSink
from tests.integration.daemon import item_counts, run_until_idle
from tests.migrations.conftest import Bench
from tests.sql.helpers import wrong_item_counts

TERMINAL_ITEMS = ("sent", "failed", "unknown", "skipped")
TERMINAL_JOBS = ("completed", "failed", "cancelled")
TERMINAL_RUNS = ("completed", "partial", "failed", "cancelled")

# Each query lists the rows that break an invariant of docs/EXECUTION_CONTRACT.md: none may.
INVARIANTS = {
    "duplicate idempotency keys": """
        SELECT idempotency_key FROM channel_outbox GROUP BY 1 HAVING count(*) > 1""",
    "two items for one contact in one run": """
        SELECT run_id, contact_id FROM channel_outbox GROUP BY 1, 2 HAVING count(*) > 1""",
    "skipped flag disagrees with status": """
        SELECT id FROM channel_outbox WHERE skipped <> (status = 'skipped')""",
    "sent item without provider id": """
        SELECT id FROM channel_outbox WHERE status = 'sent' AND provider_message_id IS NULL""",
    "completed job with non-terminal items": """
        SELECT j.id FROM job_queue j JOIN channel_outbox o ON o.job_id = j.id
        WHERE j.status = 'completed' AND o.status = 'pending'""",
    "finished run with unfinished jobs": """
        SELECT r.id FROM campaign_runs r JOIN job_queue j ON j.run_id = r.id
        WHERE r.status IN ('completed', 'partial', 'failed') AND j.status IN ('queued', 'processing')""",
    "item of another run than its job": """
        SELECT o.id FROM channel_outbox o JOIN job_queue j ON j.id = o.job_id WHERE j.run_id <> o.run_id""",
}

# The tables that hold work, with the column and values that make a row terminal: snapshots of
# their rows (as JSON, by id) prove "every row kept, terminal rows untouched".
SNAPSHOT = {
    "campaign_runs": ("status", TERMINAL_RUNS),
    "job_queue": ("status", TERMINAL_JOBS),
    "channel_outbox": ("status", TERMINAL_ITEMS),
}


def broken_invariants(conn: psycopg.Connection) -> dict[str, list[Any]]:
    found = {name: conn.execute(query).fetchall() for name, query in INVARIANTS.items()}
    return {name: rows for name, rows in found.items() if rows}


def snapshot(conn: psycopg.Connection) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        table: {str(row["id"]): row for (row,) in conn.execute(f"SELECT to_jsonb(t) FROM {table} t")}
        for table in SNAPSHOT
    }


def terminal_rows(snap: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        f"{table}/{row_id}": row
        for table, (column, terminal) in SNAPSHOT.items()
        for row_id, row in snap[table].items()
        if row[column] in terminal
    }


def as_before(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after`` cut down to the columns ``before`` had: an upgrade may add columns."""
    return {column: after.get(column) for column in before}


def function_sections(dump: str) -> dict[str, str]:
    """A schema dump's function sections by signature: ``kernel.f(args)`` → its DDL."""
    kinds = "SCHEMA|TYPE|TABLE|VIEW|MATERIALIZED VIEW|SEQUENCE|FUNCTION|PROCEDURE"
    parts = re.split(rf"\n\n-- ((?:{kinds}) [^\n]+)\n\n", dump)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    return {title.removeprefix("FUNCTION "): body for title, body in sections.items() if title.startswith("FUNCTION ")}


def next_version(version: str) -> str:
    major, minor, patch = freeze.version_key(version)
    return f"{major}.{minor}.{patch + 1}"


def api_signatures(conn: psycopg.Connection, schema: str) -> set[tuple[str, str]]:
    """The public functions (no leading underscore) with their result types."""
    rows = conn.execute(
        """SELECT format('%%s(%%s)', p.proname, pg_get_function_identity_arguments(p.oid)),
                  pg_get_function_result(p.oid)
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = %s AND p.proname !~ '^_'""",
        [schema],
    ).fetchall()
    return set(rows)


@pytest.fixture
def kernel_conn(bench: Bench) -> Iterator[psycopg.Connection]:
    """To the bench's database; autocommit, kernel schema on the path: functions unqualified."""
    with psycopg.connect(bench.dsn, autocommit=True, options=f"-c search_path={bench.schema},public") as conn:
        yield conn


def migrated(bench: Bench) -> None:
    result = bench.migrate()
    assert result.exit_code == 0, result.output


class CrashedWorker:
    """A first-release worker driven by hand through the v1 functions (which every later kernel
    keeps), that stops mid-job as if killed: its lease runs out a second after its last call."""

    name = "first-release-worker"

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        conn.execute("SET execution_kernel.lease_seconds = '1'")

    def claim(self) -> Any:
        (job_id,) = self.conn.execute("SELECT id FROM claim_queued_jobs(%s, 1)", [self.name]).fetchone()
        return job_id

    def reserve(self, job_id: Any, count: int) -> list[tuple[Any, str]]:
        return self.conn.execute(
            "SELECT id, recipient FROM reserve_outbox_items(%s, %s, %s)", [job_id, self.name, count]
        ).fetchall()

    def dispatch(self, job_id: Any, item_ids: list[Any]) -> None:
        self.conn.execute("SELECT mark_outbox_dispatched(%s, %s, %s)", [job_id, self.name, item_ids])

    def record(self, job_id: Any, item_ids: list[Any], outcome: str) -> None:
        results = [
            {"id": str(item_id), "outcome": outcome,
             "provider_message_id": f"pre-upgrade-{item_id}" if outcome == "sent" else None,
             "error": None if outcome == "sent" else "rejected before the upgrade"}
            for item_id in item_ids
        ]
        self.conn.execute(
            "SELECT record_outbox_results(%s, %s, %s::jsonb)", [job_id, self.name, Json(results)]
        )

    def finish_job(self, job_id: Any) -> None:
        """Send (pretend) every item of the job, then complete it."""
        while items := self.reserve(job_id, 500):
            ids = [item_id for item_id, _ in items]
            self.dispatch(job_id, ids)
            self.record(job_id, ids, "sent")
        self.conn.execute("SELECT complete_job(%s, true, NULL, %s)", [job_id, self.name])


def deploy(conn: psycopg.Connection, schema: str, seeded: SeededCampaign, batch_size: int) -> Any:
    return Kernel(conn, schema).deploy_campaign(seeded.campaign_id, batch_size)


def test_upgrade_from_first_release_keeps_in_flight_work(
    bench: Bench, sql_dir: Path, kernel_conn: psycopg.Connection
) -> None:
    conn, kernel_schema = kernel_conn, bench.schema
    _first_release, *later = sorted((bench.sql / "migrations").glob("*.sql"))
    for migration in later:
        migration.unlink()
    migrated(bench)
    first_api = api_signatures(conn, kernel_schema)
    with SmtpSink() as sink:
        # A finished run: its rows are terminal and must never change again.
        done = seed_campaign(conn, kernel_schema, contacts=40, provider="smtp",
                             settings=sink.provider_settings(), unsubscribed_every=10)
        done_run = deploy(conn, kernel_schema, done, 100)
        worker = CrashedWorker(conn)
        worker.finish_job(worker.claim())

        # A run in flight: three jobs, the first claimed by the worker that then "crashed".
        live = seed_campaign(conn, kernel_schema, contacts=300, provider="smtp",
                             settings=sink.provider_settings(), unsubscribed_every=10, no_address_every=25)
        live_run = deploy(conn, kernel_schema, live, 100)
        job_id = worker.claim()
        items = [item_id for item_id, _ in worker.reserve(job_id, 40)]
        worker.dispatch(job_id, items[:30])
        pre_sent, pre_failed, in_flight = items[:10], items[10:15], items[15:30]
        worker.record(job_id, pre_sent, "sent")
        worker.record(job_id, pre_failed, "failed")
        pre_sent_recipients = {r for (r,) in conn.execute(
            "SELECT recipient FROM channel_outbox WHERE id = ANY(%s)", [pre_sent])}

        assert conn.execute("SELECT status, count(*) FROM job_queue WHERE run_id = %s GROUP BY 1 ORDER BY 1",
                            [live_run]).fetchall() == [("processing", 1), ("queued", 2)]
        assert item_counts(conn, [live_run])["pending"] == 40 - 15
        assert broken_invariants(conn) == {}
        before = snapshot(conn)

        for migration in later:
            shutil.copy(sql_dir / "migrations" / migration.name, migration)
        migrated(bench)

        after = snapshot(conn)
        assert broken_invariants(conn) == {}
        assert wrong_item_counts(conn, kernel_schema) == []  # 1.6 counted the items already there
        assert conn.execute("SELECT count(*) FROM job_item_counts").fetchone()[0] > 0
        for table, rows in before.items():
            assert after[table].keys() == rows.keys(), f"{table}: rows lost or added by the upgrade"
            changed = [row_id for row_id, row in rows.items() if as_before(row, after[table][row_id]) != row]
            assert changed == [], f"{table}: the upgrade changed rows {changed}"
        assert first_api <= api_signatures(conn, kernel_schema), (
            "a function of the first release was removed or changed"
        )
        installed = conn.execute("SELECT kernel_version()").fetchone()[0]
        assert freeze.migrations_version(sql_dir / "migrations") == installed

        time.sleep(1.1)  # the crashed worker's lease runs out
        run_until_idle(bench.dsn, kernel_schema, "--lease-seconds", "5")
        received = sink.count_by_recipient()

    finished = snapshot(conn)
    assert broken_invariants(conn) == {}
    assert wrong_item_counts(conn, kernel_schema) == []
    terminal_before = terminal_rows(before)
    terminal_now = terminal_rows(finished)
    assert {key: as_before(row, terminal_now[key]) for key, row in terminal_before.items()} == terminal_before
    assert {status for (status,) in conn.execute(
        "SELECT status FROM campaign_runs WHERE id = ANY(%s)", [[done_run, live_run]])} <= set(TERMINAL_RUNS)
    assert conn.execute("SELECT status FROM campaign_runs WHERE id = %s", [live_run]).fetchone()[0] == "partial"
    counts = item_counts(conn, [live_run])
    # SMTP cannot deduplicate: what was dispatched without an outcome ends unknown, never re-sent.
    assert counts == {
        "sent": live.reachable - len(pre_failed) - len(in_flight),
        "failed": len(pre_failed),
        "unknown": len(in_flight),
        "skipped": live.contacts - live.reachable,
    }
    assert set(received.values()) == {1}
    assert len(received) == counts["sent"] - len(pre_sent)
    assert not pre_sent_recipients & set(received)


def test_rollback_is_a_forward_migration_restoring_the_functions(
    bench: Bench, kernel_conn: psycopg.Connection
) -> None:
    conn, kernel_schema = kernel_conn, bench.schema
    good_version = freeze.migrations_version(bench.sql / "migrations")
    migrated(bench)
    good = function_sections(schema_dump.dump(conn, kernel_schema))

    # A bad release: claiming returns nothing, so every campaign stalls.
    bad_version = next_version(good_version)
    bench.add("bad_claim", f"""
SET LOCAL ROLE kernel_owner;
CREATE OR REPLACE FUNCTION kernel.claim_queued_jobs(p_worker text, p_max_jobs integer)
RETURNS SETOF kernel.job_queue
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM kernel.job_queue WHERE false
$$;
{version_sql(bad_version)}""")
    migrated(bench)
    bad = function_sections(schema_dump.dump(conn, kernel_schema))
    with SmtpSink() as sink:
        seeded = seed_campaign(conn, kernel_schema, contacts=50, provider="smtp", settings=sink.provider_settings())
        run_id = deploy(conn, kernel_schema, seeded, 1000)
        assert conn.execute("SELECT count(*) FROM claim_queued_jobs('probe', 1)").fetchone()[0] == 0

        # The rollback: every function the bad release changed, as the good release defined it
        # (its schema dump is executable DDL), and the version moves on.
        changed = [signature for signature, ddl in bad.items()
                   if good.get(signature) != ddl and signature != "kernel.kernel_version()"]
        assert changed == ["kernel.claim_queued_jobs(p_worker text, p_max_jobs integer)"]
        rollback_version = next_version(bad_version)
        bench.add("rollback_bad_claim", "SET LOCAL ROLE kernel_owner;\n"
                      + "\n".join(good[signature] for signature in changed) + version_sql(rollback_version))
        assert freeze.migrations_version(bench.sql / "migrations") == rollback_version
        migrated(bench)

        restored = function_sections(schema_dump.dump(conn, kernel_schema))
        version_function = "kernel.kernel_version()"
        assert {k: v for k, v in restored.items() if k != version_function} == \
               {k: v for k, v in good.items() if k != version_function}
        assert conn.execute("SELECT kernel_version()").fetchone()[0] == rollback_version

        # The campaign deployed under the bad release goes out after the rollback.
        run_until_idle(bench.dsn, kernel_schema)
        assert len(sink.count_by_recipient()) == seeded.reachable
    assert item_counts(conn, [run_id]) == {"sent": seeded.reachable}
    assert conn.execute("SELECT status FROM campaign_runs WHERE id = %s", [run_id]).fetchone()[0] == "completed"

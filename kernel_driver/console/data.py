"""The console's reads: plain SELECTs on the kernel's tables, run as the request's role with its
tenant scope, so row-level security decides which rows exist. Every list is one keyset page
(at most PAGE rows past a cursor); counts are GROUP BYs over an index. No read loads all of a
run's items, jobs or events.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

PAGE = 50


class Reads:
    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    def _rows(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        statement = sql.SQL(query).format(schema=sql.Identifier(self.schema))
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(statement, params)
            return cur.fetchall()

    def run_status_counts(self, tenant_id: uuid.UUID | None) -> dict[str, int]:
        rows = self._rows(
            "SELECT status, count(*) AS n FROM {schema}.campaign_runs"
            " WHERE (%(tenant)s::uuid IS NULL OR tenant_id = %(tenant)s) GROUP BY status",
            {"tenant": tenant_id},
        )
        return {row["status"]: row["n"] for row in rows}

    def runs(self, *, status: str | None, campaign_id: uuid.UUID | None, tenant_id: uuid.UUID | None,
             before: tuple[datetime, uuid.UUID] | None) -> list[dict[str, Any]]:
        """A page of runs, newest first, older than the cursor `before` (created_at, id)."""
        return self._rows(
            "SELECT r.id, r.status, r.channel, r.generation, r.priority, r.created_at, r.start_at,"
            " r.tenant_id, r.campaign_id, r.retry_of_run_id, c.name AS campaign,"
            " (SELECT jsonb_object_agg(s.status, s.n) FROM (SELECT j.status, count(*) AS n"
            "   FROM {schema}.job_queue AS j WHERE j.run_id = r.id GROUP BY j.status) AS s) AS job_counts"
            " FROM {schema}.campaign_runs AS r"
            " INNER JOIN {schema}.campaigns AS c ON c.id = r.campaign_id AND c.tenant_id = r.tenant_id"
            " WHERE (%(status)s::text IS NULL OR r.status = %(status)s)"
            " AND (%(campaign)s::uuid IS NULL OR r.campaign_id = %(campaign)s)"
            " AND (%(tenant)s::uuid IS NULL OR r.tenant_id = %(tenant)s)"
            " AND (%(before_at)s::timestamptz IS NULL OR (r.created_at, r.id) < (%(before_at)s, %(before_id)s::uuid))"
            " ORDER BY r.created_at DESC, r.id DESC LIMIT %(page)s",
            {"status": status, "campaign": campaign_id, "tenant": tenant_id, "page": PAGE,
             "before_at": before[0] if before else None, "before_id": before[1] if before else None},
        )

    def run(self, run_id: uuid.UUID) -> dict[str, Any] | None:
        found = self._rows(
            "SELECT r.*, c.name AS campaign FROM {schema}.campaign_runs AS r"
            " INNER JOIN {schema}.campaigns AS c ON c.id = r.campaign_id AND c.tenant_id = r.tenant_id"
            " WHERE r.id = %(run)s",
            {"run": run_id},
        )
        return found[0] if found else None

    def lineage(self, root_run_id: uuid.UUID) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT id, generation, status, retry_of_run_id, created_at FROM {schema}.campaign_runs"
            " WHERE root_run_id = %(root)s ORDER BY generation, created_at",
            {"root": root_run_id},
        )

    def job_counts(self, run_id: uuid.UUID) -> dict[str, int]:
        rows = self._rows("SELECT status, count(*) AS n FROM {schema}.job_queue WHERE run_id = %(run)s GROUP BY status",
                          {"run": run_id})
        return {row["status"]: row["n"] for row in rows}

    def item_counts(self, run_id: uuid.UUID) -> dict[str, int]:
        """From the kernel's counters (job_item_counts, 1.6): a few rows per job, not every item."""
        rows = self._rows(
            "SELECT status, sum(items) AS n FROM {schema}.job_item_counts WHERE run_id = %(run)s"
            " GROUP BY status HAVING sum(items) > 0",
            {"run": run_id},
        )
        return {row["status"]: int(row["n"]) for row in rows}

    def items_of_status(self, run_id: uuid.UUID, status: str,
                        after: tuple[uuid.UUID, uuid.UUID] | None) -> list[dict[str, Any]]:
        """A page of the run's items in one status, in (job, id) order after the cursor: only
        the jobs whose counters have such items are read, so a rare status is found at once."""
        # PAGE + 1 jobs hold a page: each but the first (read from the cursor on) has one at
        # least. Chosen first and apart (MATERIALIZED): under row-level security the planner
        # cannot estimate the rows and would otherwise read every job's items before sorting.
        return self._rows(
            "WITH jobs AS MATERIALIZED (SELECT job_id, tenant_id, status FROM {schema}.job_item_counts"
            "   WHERE run_id = %(run)s AND status = %(status)s AND items > 0"
            "   AND (%(after_job)s::uuid IS NULL OR job_id >= %(after_job)s)"
            "   ORDER BY job_id LIMIT %(page)s + 1)"
            " SELECT o.* FROM jobs AS c"
            " CROSS JOIN LATERAL (SELECT * FROM {schema}.channel_outbox AS i"
            "   WHERE i.job_id = c.job_id AND i.tenant_id = c.tenant_id AND i.status = c.status"
            "   AND (%(after_job)s::uuid IS NULL OR (i.job_id, i.id) > (%(after_job)s, %(after_id)s::uuid))"
            "   ORDER BY i.id LIMIT %(page)s) AS o"
            " ORDER BY c.job_id, o.id LIMIT %(page)s",
            {"run": run_id, "status": status, "page": PAGE, "after_job": after[0] if after else None,
             "after_id": after[1] if after else None},
        )

    def jobs(self, run_id: uuid.UUID, after: tuple[datetime, uuid.UUID] | None) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT id, status, attempts, cardinality(contact_ids) AS contacts, locked_by, lease_expires_at,"
            " run_after, last_error, created_at FROM {schema}.job_queue WHERE run_id = %(run)s"
            " AND (%(after_at)s::timestamptz IS NULL OR (created_at, id) > (%(after_at)s, %(after_id)s::uuid))"
            " ORDER BY created_at, id LIMIT %(page)s",
            {"run": run_id, "page": PAGE, "after_at": after[0] if after else None,
             "after_id": after[1] if after else None},
        )

    def events(self, run_id: uuid.UUID, before: tuple[datetime, int] | None) -> list[dict[str, Any]]:
        """The latest state changes of the run, newest first, older than the cursor."""
        return self._rows(
            "SELECT id, occurred_at, entity, job_id, from_status, to_status, worker, detail"
            " FROM {schema}.job_events WHERE run_id = %(run)s"
            " AND (%(before_at)s::timestamptz IS NULL OR (occurred_at, id) < (%(before_at)s, %(before_id)s))"
            " ORDER BY occurred_at DESC, id DESC LIMIT %(page)s",
            {"run": run_id, "page": PAGE, "before_at": before[0] if before else None,
             "before_id": before[1] if before else None},
        )

    def campaigns(self, after: str | None) -> list[dict[str, Any]]:
        """A page of the campaigns in scope by name, with their latest run."""
        return self._rows(
            "SELECT c.id, c.name, c.channel, c.workspace_id, c.tenant_id, latest.id AS run_id,"
            " latest.status AS run_status FROM {schema}.campaigns AS c"
            " LEFT JOIN LATERAL (SELECT r.id, r.status FROM {schema}.campaign_runs AS r"
            "   WHERE r.campaign_id = c.id AND r.tenant_id = c.tenant_id"
            "   ORDER BY r.created_at DESC LIMIT 1) AS latest ON true"
            " WHERE (%(after)s::text IS NULL OR (c.name || ' ' || c.id::text) > %(after)s)"
            " ORDER BY c.name || ' ' || c.id::text LIMIT %(page)s",
            {"after": after, "page": PAGE},
        )

    def campaign(self, campaign_id: uuid.UUID) -> dict[str, Any] | None:
        found = self._rows(
            "SELECT id, name, channel, workspace_id, tenant_id FROM {schema}.campaigns WHERE id = %(id)s",
            {"id": campaign_id},
        )
        return found[0] if found else None

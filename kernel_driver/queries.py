"""One typed wrapper per kernel SQL function the driver calls (the daemon's, the application's and
the operator's); demo, certify, runs and the tests call the kernel through them.

Each call is one statement on an autocommit connection, so each is its own short transaction:
no transaction is ever held open across a provider call. No call relies on session state (the
lease, the tenant and the worker travel as arguments), so all of them work through a
transaction-mode pooler.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.string import TextLoader

from kernel_driver.db import wrap_errors

NOTIFY_CHANNEL = "kernel_jobs"


# The run statuses with no move out of them in kernel.state_transitions (a parity test keeps
# them equal).
TERMINAL_RUN_STATUSES = frozenset({"completed", "partial", "failed", "cancelled"})
# Every run status, as campaign_runs_status_check has them (tests/integration/test_queries.py).
RUN_STATUSES = ("queued", "running", "completed", "partial", "failed", "cancelled")
# Every outbox item status, as channel_outbox_status_check has them (the same test).
ITEM_STATUSES = ("pending", "sent", "failed", "unknown", "skipped")


@dataclass(frozen=True)
class QueueDepth:
    status: str
    jobs: int
    oldest_age_seconds: float


@dataclass(frozen=True)
class LaunchCheck:
    check_name: str
    passed: bool
    detail: str | None


@dataclass(frozen=True)
class RunSummary:
    id: UUID
    status: str
    channel: str
    generation: int
    created_at: datetime
    campaign: str
    priority: int
    start_at: datetime | None
    # Jobs waiting: for the run's start (scheduled) or, once it started, for a send window.
    scheduled_jobs: int
    retry_of_run_id: UUID | None


class Result(NamedTuple):
    """What one provider call came to, as worker_step records it."""

    item_id: str
    outcome: str  # sent, failed, unknown or retry (providers.outbox_outcome)
    provider_message_id: str | None
    response: str | None  # JSON text
    error: str | None


@dataclass
class StepRequest:
    """The arguments of one worker_step call (see its comment in the migration)."""

    worker: str
    lease_seconds: float
    tenant_ids: Sequence[UUID] | None  # None: every tenant in scope
    held: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)
    redispatch: list[str] = field(default_factory=list)
    want: int = 0
    claim: int = 0
    deduplicating: list[str] = field(default_factory=list)


class StepRow(NamedTuple):
    """One row of worker_step: kind is lost, waiting, stale, done, job, cancelled, item, held,
    wait or idle; the other columns are set as the kind needs. Ids come as text: the daemon
    only hands them back to the kernel and to adapters, and parsing and printing uuids cost a
    tenth of its main thread (py-spy)."""

    kind: str
    job_id: str | None
    run_id: str | None
    item_id: str | None
    idempotency_key: str | None
    recipient: str | None
    contact_id: str | None
    detail: Any


class Kernel:
    """The kernel functions in `schema`, called over one autocommit connection."""

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self._statements: dict[str, sql.Composed] = {}

    def _call(self, query: str, params: Sequence[Any] | Mapping[str, Any], row_factory: Any = None, *,
              uuid_as_text: bool = False) -> list[Any]:
        statement = self._statements.get(query)
        if statement is None:
            statement = self._statements[query] = sql.SQL(query).format(schema=sql.Identifier(self.schema))
        with wrap_errors(), self.conn.cursor(row_factory=row_factory) as cur:
            if uuid_as_text:
                cur.adapters.register_loader("uuid", TextLoader)
            cur.execute(statement, params)
            return cur.fetchall()

    def _scalar(self, query: str, params: Sequence[Any]) -> Any:
        return self._call(query, params)[0][0]

    def worker_step(self, request: StepRequest) -> list[StepRow]:
        # The arrays go as array literals built here: psycopg's list dumper, in Python, cost
        # a quarter of the daemon's main thread at --concurrency 256 (py-spy --gil).
        results = request.results
        return self._call(
            "SELECT kind, job_id, run_id, item_id, idempotency_key, recipient, contact_id, detail"
            " FROM {schema}.worker_step(%s::text, %s::numeric, %s::uuid[], %s::uuid[], %s::text[],"
            " %s::text[], %s::text[], %s::text[], %s::uuid[], %s::uuid[], %s::text[], %s::uuid[],"
            " %s::integer, %s::integer, %s::text[], %s::uuid[])",
            (
                request.worker, request.lease_seconds, uuid_array(request.held),
                uuid_array([r.item_id for r in results]), text_array([r.outcome for r in results]),
                text_array([r.provider_message_id for r in results]), text_array([r.response for r in results]),
                text_array([r.error for r in results]),
                uuid_array(request.complete), uuid_array(request.fail), text_array(request.fail.values()),
                uuid_array(request.redispatch),
                request.want, request.claim, text_array(request.deduplicating),
                None if request.tenant_ids is None else uuid_array(request.tenant_ids),
            ),
            _step_rows,
            uuid_as_text=True,
        )

    def release_jobs(self, worker: str, job_ids: Sequence[str | UUID], reason: str,
                     tenant_ids: Sequence[UUID] | None = None) -> int:
        """Hand back the jobs `worker` still holds (of `tenant_ids`; None: every tenant in scope)."""
        return int(self._scalar(
            "SELECT {schema}.release_jobs(%s, %s::uuid[], %s, %s::uuid[])",
            (worker, list(job_ids), reason, None if tenant_ids is None else uuid_array(tenant_ids)),
        ))

    def undispatch_items(self, worker: str, job_ids: Sequence[str | UUID], known_item_ids: Iterable[str | UUID],
                         tenant_ids: Sequence[UUID] | None = None) -> list[tuple[str, str, str, str, str, str]]:
        """After a lost connection: the items of held jobs marked dispatched that the daemon
        never handed to a provider, back to undispatched; each as (job, run, item, key,
        recipient, contact), ids as text."""
        return self._call(
            "SELECT job_id, run_id, id, idempotency_key, recipient, contact_id"
            " FROM {schema}.undispatch_items(%s, %s::uuid[], %s::uuid[], %s::uuid[])",
            (worker, uuid_array(job_ids), uuid_array(known_item_ids),
             None if tenant_ids is None else uuid_array(tenant_ids)),
            uuid_as_text=True,
        )

    def queue_stats(self) -> list[QueueDepth]:
        return self._call(
            "SELECT status, jobs, oldest_age_seconds FROM {schema}.queue_stats()",
            (),
            class_row(QueueDepth),
        )

    # --- the application's and the operator's functions ---------------------------------

    def deploy_campaign(self, campaign_id: UUID, batch_size: int | None = None, *,
                        start_at: datetime | None = None, priority: int | None = None,
                        deadline: datetime | None = None) -> UUID:
        """A new run of the campaign: the seed's one-argument form without batch_size, the
        1.0 form with it, the 1.4 form (a start, a priority, a deadline) when any is given."""
        if start_at is not None or priority is not None or deadline is not None:
            return UUID(str(self._scalar(
                "SELECT {schema}.deploy_campaign(%s, %s::timestamptz, %s, %s::timestamptz, %s)",
                (campaign_id, start_at, priority, deadline, 1000 if batch_size is None else batch_size),
            )))
        if batch_size is None:
            return UUID(str(self._scalar("SELECT {schema}.deploy_campaign(%s)", (campaign_id,))))
        return UUID(str(self._scalar("SELECT {schema}.deploy_campaign(%s, %s)", (campaign_id, batch_size))))

    def retry_campaign_run(self, run_id: UUID | str, include_unknown: bool | None = None) -> UUID:
        """A retry run for the failed (and, with include_unknown, the unknown) items of a run."""
        if include_unknown is None:
            return UUID(str(self._scalar("SELECT {schema}.retry_campaign_run(%s)", (run_id,))))
        return UUID(str(self._scalar(
            "SELECT {schema}.retry_campaign_run(%s, %s)", (run_id, include_unknown)
        )))

    def cancel_campaign_run(self, run_id: UUID | str) -> None:
        self._call("SELECT {schema}.cancel_campaign_run(%s)", (run_id,))

    def launch_checks(self, campaign_id: UUID, workspace_id: UUID) -> list[LaunchCheck]:
        return self._call(
            "SELECT check_name, passed, detail FROM {schema}.check_campaign_launch_prerequisites(%s, %s)",
            (campaign_id, workspace_id),
            class_row(LaunchCheck),
        )

    def latest_runs(self, limit: int, *, campaign_id: UUID | None = None, status: str | None = None,
                    since: datetime | None = None, tenant_id: UUID | None = None) -> list[RunSummary]:
        """The latest runs in scope, newest first, optionally of one campaign, status or tenant,
        created since a time (a read of the tables: no kernel function lists runs)."""
        return self._call(
            "SELECT r.id, r.status, r.channel, r.generation, r.created_at, c.name AS campaign,"
            " r.priority, r.start_at,"
            " (SELECT count(*) FROM {schema}.job_queue AS j WHERE j.run_id = r.id AND j.status = 'scheduled')"
            " AS scheduled_jobs, r.retry_of_run_id"
            " FROM {schema}.campaign_runs AS r INNER JOIN {schema}.campaigns AS c ON c.id = r.campaign_id"
            " WHERE (%(campaign)s::uuid IS NULL OR r.campaign_id = %(campaign)s)"
            " AND (%(status)s::text IS NULL OR r.status = %(status)s)"
            " AND (%(since)s::timestamptz IS NULL OR r.created_at >= %(since)s)"
            " AND (%(tenant)s::uuid IS NULL OR r.tenant_id = %(tenant)s)"
            " ORDER BY r.created_at DESC, r.id LIMIT %(limit)s",
            {"campaign": campaign_id, "status": status, "since": since, "tenant": tenant_id, "limit": limit},
            class_row(RunSummary),
        )

    def run_items(self, run_id: UUID | str, status: str | None = None, after: UUID | str | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
        """A page of a run's items in id order (of one status when given), after the id `after`;
        each as run_details lists items (JSON)."""
        rows = self._call("SELECT to_jsonb(i) FROM {schema}.run_items(%s, %s, %s, %s) AS i",
                          (run_id, status, after, limit))
        return [row[0] for row in rows]

    def run_details(self, run_id: UUID | str, item_limit: int | None = None) -> dict[str, Any]:
        """The run, its jobs, its first item_limit outbox items (the one-argument form's 1,000
        without it), counts per status and lineage."""
        details: dict[str, Any]
        if item_limit is None:
            details = self._scalar("SELECT {schema}.run_details(%s)", (run_id,))
        else:
            details = self._scalar("SELECT {schema}.run_details(%s, %s)", (run_id, item_limit))
        return details


def _step_rows(_cursor: Any) -> Any:
    return StepRow._make


def uuid_array(values: Iterable[str | UUID]) -> str:
    """A uuid[] literal: {a,b,c}."""
    return "{" + ",".join(map(str, values)) + "}"


def text_array(values: Iterable[str | None]) -> str:
    """A text[] literal: every element double-quoted with backslash and quote escaped, None as
    NULL (the array input syntax of PostgreSQL's documentation, 8.15.6)."""
    return "{" + ",".join(
        "NULL" if value is None else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for value in values
    ) + "}"


def response_json(response: dict[str, Any]) -> str | None:
    return json.dumps(response, default=str) if response else None


def listen(conn: psycopg.Connection) -> None:
    """Subscribe `conn` (autocommit) to the wake-ups deploy, retry and release send."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))

"""One typed wrapper per kernel SQL function the daemon calls; nothing else in the daemon talks SQL.

Each call is one statement on an autocommit connection, so each is its own short transaction:
no transaction is ever held open across a provider call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from kernel_driver.db import wrap_errors

NOTIFY_CHANNEL = "kernel_jobs"


@dataclass(frozen=True)
class ClaimedJob:
    id: UUID
    run_id: UUID
    workspace_id: UUID
    attempts: int
    max_attempts: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class ReservedItem:
    id: UUID
    idempotency_key: str
    channel: str
    recipient: str
    contact_id: UUID
    run_id: UUID


@dataclass(frozen=True)
class QueueDepth:
    status: str
    jobs: int
    oldest_age_seconds: float


class Kernel:
    """The kernel functions in `schema`, called over one autocommit connection."""

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    def _call(self, query: str, params: Sequence[Any], row_factory: Any = None) -> list[Any]:
        statement = sql.SQL(query).format(schema=sql.Identifier(self.schema))
        with wrap_errors(), self.conn.cursor(row_factory=row_factory) as cur:
            cur.execute(statement, params)
            return cur.fetchall()

    def _scalar(self, query: str, params: Sequence[Any]) -> Any:
        return self._call(query, params)[0][0]

    def claim_queued_jobs(self, worker: str, max_jobs: int) -> list[ClaimedJob]:
        return self._call(
            "SELECT id, run_id, workspace_id, attempts, max_attempts, lease_expires_at"
            " FROM {schema}.claim_queued_jobs(%s, %s)",
            (worker, max_jobs),
            class_row(ClaimedJob),
        )

    def job_context(self, job_id: UUID, worker: str) -> dict[str, Any]:
        return self._scalar("SELECT {schema}.job_context(%s, %s)", (job_id, worker))

    def heartbeat_job(self, job_id: UUID, worker: str) -> datetime:
        return self._scalar("SELECT {schema}.heartbeat_job(%s, %s)", (job_id, worker))

    def release_job(self, job_id: UUID, worker: str, reason: str) -> None:
        self._call("SELECT FROM {schema}.release_job(%s, %s, %s)", (job_id, worker, reason))

    def recover_dispatched_items(self, job_id: UUID, worker: str, deduplicates: bool) -> int:
        return self._scalar(
            "SELECT {schema}.recover_dispatched_items(%s, %s, %s)", (job_id, worker, deduplicates)
        )

    def reserve_outbox_items(self, job_id: UUID, worker: str, max_items: int) -> list[ReservedItem]:
        return self._call(
            "SELECT id, idempotency_key, channel, recipient, contact_id, run_id"
            " FROM {schema}.reserve_outbox_items(%s, %s, %s)",
            (job_id, worker, max_items),
            class_row(ReservedItem),
        )

    def mark_outbox_dispatched(self, job_id: UUID, worker: str, item_ids: Sequence[UUID]) -> int:
        return self._scalar(
            "SELECT {schema}.mark_outbox_dispatched(%s, %s, %s)", (job_id, worker, list(item_ids))
        )

    def record_outbox_results(self, job_id: UUID, worker: str, results: Sequence[dict[str, Any]]) -> int:
        return self._scalar(
            "SELECT {schema}.record_outbox_results(%s, %s, %s::jsonb)",
            (job_id, worker, json.dumps(list(results), default=str)),
        )

    def complete_job(self, job_id: UUID, success: bool, error: str | None, worker: str) -> str:
        """Returns the run's status after the job ended."""
        return self._scalar(
            "SELECT {schema}.complete_job(%s, %s, %s, %s)", (job_id, success, error, worker)
        )

    def take_rate_tokens(self, workspace_id: UUID, provider: str, wanted: int) -> int:
        return self._scalar(
            "SELECT {schema}.take_rate_tokens(%s, %s, %s)", (workspace_id, provider, wanted)
        )

    def queue_stats(self) -> list[QueueDepth]:
        return self._call(
            "SELECT status, jobs, oldest_age_seconds FROM {schema}.queue_stats()",
            (),
            class_row(QueueDepth),
        )

    def run_details(self, run_id: UUID, item_limit: int) -> dict[str, Any]:
        return self._scalar("SELECT {schema}.run_details(%s, %s)", (run_id, item_limit))


def listen(conn: psycopg.Connection) -> None:
    """Subscribe `conn` (autocommit) to the wake-ups deploy, retry and release send."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))


"""The daemon: claim a job → reserve items → mark a chunk dispatched → call the provider → record.

Every state change is a kernel SQL function (queries.Kernel); this module only does I/O and
scheduling. Each SQL call is its own short transaction, and the outbox rows of a chunk are
committed as dispatched *before* the provider is called (invariant 1), so after a crash at most
one chunk (`concurrency` items) can end `unknown`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from psycopg import sql

from kernel_driver.db import KernelError, LeaseLost, connect
from kernel_driver.providers import (
    OutboundItem,
    ProviderAdapter,
    ProviderConfigError,
    SendResult,
    load_adapter,
    outbox_outcome,
)
from kernel_driver.queries import ClaimedJob, Kernel, ReservedItem, listen

log = logging.getLogger(__name__)

ITEMS = Counter(
    "kernel_items_total", "Outbox items this daemon finished, by outcome", ["channel", "provider", "outcome"]
)
CALL_SECONDS = Histogram("kernel_provider_call_seconds", "Provider call latency", ["provider"])
JOBS_CLAIMED = Counter("kernel_jobs_claimed_total", "Jobs this daemon claimed")
JOBS_RECLAIMED = Counter(
    "kernel_jobs_reclaimed_total", "Jobs claimed again after a release or an expired lease"
)
LEASE_LOSSES = Counter("kernel_lease_losses_total", "Jobs this daemon lost to another worker (fenced)")
QUEUE_JOBS = Gauge("kernel_queue_jobs", "Jobs in the queue by status (all workers)", ["status"])
QUEUE_OLDEST = Gauge(
    "kernel_queue_oldest_job_age_seconds", "Age of the oldest job by status (all workers)", ["status"]
)

RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class WorkerConfig:
    dsn: str
    schema: str
    worker_id: str
    concurrency: int = 8
    reserve_batch: int = 100
    poll_interval: float = 2.0
    lease_seconds: float = 30.0
    grace_seconds: float = 10.0
    until_idle: bool = False
    metrics_port: int | None = None


class StopWork(Exception):
    """Shutdown asked while a job was in hand: release it for another worker."""


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._adapters: dict[str, ProviderAdapter] = {}
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="provider")

    # --- the main loop --------------------------------------------------------------------

    def run(self) -> None:
        """Work until stopped (or, with until_idle, until no queued or processing job is left)."""
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, addr="127.0.0.1")
        log.info("worker started", extra={"worker": self.config.worker_id})
        try:
            while not self.stop.is_set():
                try:
                    self._serve()
                    return
                except psycopg.OperationalError as exc:
                    log.error("database connection lost, reconnecting: %s", exc)
                    self.stop.wait(self.config.poll_interval)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for adapter in self._adapters.values():
                adapter.close()
            log.info("worker stopped", extra={"worker": self.config.worker_id})

    def _serve(self) -> None:
        with self._connect() as conn, self._connect() as listener:
            listen(listener)
            kernel = Kernel(conn, self.config.schema)
            while not self.stop.is_set():
                jobs = kernel.claim_queued_jobs(self.config.worker_id, 1)
                if jobs:
                    self._process(kernel, jobs[0])
                    continue
                depth = {q.status: q for q in kernel.queue_stats()}
                self._publish_queue_metrics(depth)
                if self.config.until_idle and not depth:
                    log.info("no work left", extra={"worker": self.config.worker_id})
                    return
                self._wait_for_work(listener)

    def _connect(self) -> psycopg.Connection:
        conn = connect(self.config.dsn, autocommit=True)
        # The lease length is read by claim_queued_jobs and heartbeat_job from this setting.
        conn.execute(
            sql.SQL("SET execution_kernel.lease_seconds = {}").format(
                sql.Literal(str(self.config.lease_seconds))
            )
        )
        return conn

    def _wait_for_work(self, listener: psycopg.Connection) -> None:
        """Return on a NOTIFY, after the poll interval, or soon after stop."""
        deadline = time.monotonic() + self.config.poll_interval
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in listener.notifies(timeout=min(remaining, 0.25), stop_after=1):
                return

    @staticmethod
    def _publish_queue_metrics(depth: dict[str, Any]) -> None:
        for status in ("queued", "processing"):
            entry = depth.get(status)
            QUEUE_JOBS.labels(status).set(entry.jobs if entry else 0)
            QUEUE_OLDEST.labels(status).set(entry.oldest_age_seconds if entry else 0)

    # --- one job ----------------------------------------------------------------------------

    def _process(self, kernel: Kernel, job: ClaimedJob) -> None:
        worker = self.config.worker_id
        JOBS_CLAIMED.inc()
        if job.attempts > 1:
            JOBS_RECLAIMED.inc()
        fields = {"job_id": str(job.id), "run_id": str(job.run_id), "attempt": job.attempts}
        log.info("job claimed job=%s run=%s attempt=%s", job.id, job.run_id, job.attempts, extra=fields)
        try:
            with self._heartbeat(job) as lease_lost:
                context = kernel.job_context(job.id, worker)
                try:
                    adapter = self._adapter(context["provider"], context["provider_settings"])
                except ProviderConfigError as exc:
                    run_status = self._fail_job(kernel, job, str(exc))
                    log.error("job failed job=%s: %s", job.id, exc, extra=fields)
                else:
                    recovered = kernel.recover_dispatched_items(job.id, worker, adapter.deduplicates)
                    if recovered:
                        log.warning(
                            "job %s: %d items dispatched by a lost worker %s",
                            job.id, recovered, "will be re-sent (provider deduplicates)"
                            if adapter.deduplicates else "ended unknown", extra=fields,
                        )
                    self._send_all(kernel, job, context, adapter, lease_lost)
                    run_status = kernel.complete_job(job.id, True, None, worker)
                    log.info("job completed job=%s", job.id, extra=fields)
        except LeaseLost as exc:
            LEASE_LOSSES.inc()
            log.warning("lease lost job=%s: %s", job.id, exc, extra=fields)
            return
        except StopWork:
            kernel.release_job(job.id, worker, f"released by {worker} on shutdown")
            log.info("job released job=%s (shutdown)", job.id, extra=fields)
            return
        except KernelError as exc:
            # A refusal the daemon did not expect: leave the job to its lease (it is re-claimed,
            # and failed after max_attempts) rather than stop serving every other job.
            log.error("job abandoned job=%s: kernel refused: %s (%s)", job.id, exc, exc.sqlstate, extra=fields)
            return
        if run_status in ("completed", "partial", "failed", "cancelled"):
            log.info("run %s run=%s", run_status, job.run_id, extra={**fields, "run_status": run_status})

    def _send_all(
        self,
        kernel: Kernel,
        job: ClaimedJob,
        context: dict[str, Any],
        adapter: ProviderAdapter,
        lease_lost: threading.Event,
    ) -> None:
        worker = self.config.worker_id
        retry_rounds = 0
        while True:
            items = kernel.reserve_outbox_items(job.id, worker, self.config.reserve_batch)
            if not items:
                return
            retried = False
            while items:
                if lease_lost.is_set():
                    raise LeaseLost(f"heartbeat for job {job.id} was refused")
                if self.stop.is_set():
                    raise StopWork
                chunk = items[: self._granted(kernel, context, min(len(items), self.config.concurrency))]
                items = items[len(chunk):]
                retried |= self._send_chunk(kernel, job, context, adapter, chunk)
            if retried:
                # Transient provider trouble: back off before the same keys go out again.
                self.stop.wait(RETRY_BACKOFF_S[min(retry_rounds, len(RETRY_BACKOFF_S) - 1)])
                retry_rounds += 1

    def _granted(self, kernel: Kernel, context: dict[str, Any], wanted: int) -> int:
        """How many sends may start now under the workspace's shared rate limit (waits for one)."""
        rate = context.get("max_per_second")
        if rate is None:
            return wanted
        while not self.stop.is_set():
            granted = kernel.take_rate_tokens(context["workspace_id"], context["provider"], wanted)
            if granted:
                return granted
            self.stop.wait(min(1.0, 1.0 / float(rate)))
        raise StopWork

    def _send_chunk(
        self,
        kernel: Kernel,
        job: ClaimedJob,
        context: dict[str, Any],
        adapter: ProviderAdapter,
        chunk: list[ReservedItem],
    ) -> bool:
        """Dispatch, call, record one chunk; True when some item is to be retried."""
        worker = self.config.worker_id
        kernel.mark_outbox_dispatched(job.id, worker, [item.id for item in chunk])
        futures = {
            self._pool.submit(self._call_provider, adapter, self._outbound(item, context)): item
            for item in chunk
        }
        finished = self._await(futures)
        results = []
        for future, item in futures.items():
            if future not in finished:
                continue  # abandoned at shutdown: dispatched, recovered by the next holder
            outcome = outbox_outcome(future.result().outcome, adapter.deduplicates)
            results.append(self._result_row(item, future.result(), outcome))
            ITEMS.labels(item.channel, adapter.name, outcome).inc()
        if results:
            kernel.record_outbox_results(job.id, worker, results)
        if len(finished) < len(futures):
            raise StopWork
        return any(row["outcome"] == "retry" for row in results)

    def _await(self, futures: dict[Future[SendResult], ReservedItem]) -> set[Future[SendResult]]:
        """Wait for the chunk's calls; after a stop, only for what is left of the grace period."""
        pending = set(futures)
        done: set[Future[SendResult]] = set()
        while pending:
            finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            done |= finished
            if self.stop.is_set():
                if self._stop_requested_at is None:
                    self._stop_requested_at = time.monotonic()
                if time.monotonic() - self._stop_requested_at > self.config.grace_seconds:
                    log.warning("grace period over: %d provider calls abandoned", len(pending))
                    break
        return done

    @staticmethod
    def _call_provider(adapter: ProviderAdapter, item: OutboundItem) -> SendResult:
        with CALL_SECONDS.labels(adapter.name).time():
            return adapter.send(item)

    @staticmethod
    def _outbound(item: ReservedItem, context: dict[str, Any]) -> OutboundItem:
        return OutboundItem(
            id=str(item.id),
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            recipient=item.recipient,
            content=context["content"],
            run_id=str(item.run_id),
            contact_id=str(item.contact_id),
        )

    @staticmethod
    def _result_row(item: ReservedItem, result: SendResult, outcome: str) -> dict[str, Any]:
        return {
            "id": str(item.id),
            "outcome": outcome,
            "provider_message_id": result.provider_message_id,
            "provider_response": result.response or None,
            "error": result.error,
        }

    def _fail_job(self, kernel: Kernel, job: ClaimedJob, error: str) -> str:
        """The provider cannot be used: every contact of the job gets a failed item saying why,
        so that a retry after the fix targets exactly them."""
        worker = self.config.worker_id
        kernel.recover_dispatched_items(job.id, worker, False)
        while items := kernel.reserve_outbox_items(job.id, worker, 1000):
            kernel.record_outbox_results(
                job.id, worker, [{"id": str(item.id), "outcome": "failed", "error": error} for item in items]
            )
        return kernel.complete_job(job.id, False, error, worker)

    def _adapter(self, provider: str, settings: dict[str, Any]) -> ProviderAdapter:
        key = f"{provider}:{json.dumps(settings, sort_keys=True)}"
        if key not in self._adapters:
            self._adapters[key] = load_adapter(provider)(settings)
        return self._adapters[key]

    @contextmanager
    def _heartbeat(self, job: ClaimedJob) -> Iterator[threading.Event]:
        """Extend the lease every third of its length on a connection of its own.

        Yields an event set when the kernel refuses a heartbeat: the lease is lost.
        """
        lost = threading.Event()
        done = threading.Event()
        interval = self.config.lease_seconds / 3

        def beat() -> None:
            try:
                with self._connect() as conn:
                    kernel = Kernel(conn, self.config.schema)
                    while not done.wait(interval):
                        kernel.heartbeat_job(job.id, self.config.worker_id)
            except LeaseLost:
                lost.set()
            except Exception as exc:  # no heartbeat means no lease: stop working on the job
                log.error("heartbeat for job %s failed: %s", job.id, exc)
                lost.set()

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop` (drain, release, exit 0); the old handlers come back after."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing in-flight calls, then stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
